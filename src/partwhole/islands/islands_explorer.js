// The islands explorer's script (inlined into islands.html by agglomerator/islands_html.py).
// Data: per image, per state and level, either the columns' vectors ("vectors": int8, (column, dim), each vector
// scaled so that its largest component is +-127; the cosines are computed here) or the cosines themselves
// ("triangle": round(127 cos), the upper triangle with the diagonal, row-major), whichever is smaller. Masks: each distinct
// mask once, bit-packed big-endian (numpy packbits), and an (n, levels) index: point k at level l has mask index[k][l].
// window.islandsExplorer lets a test (or a console) read the numbers behind the maps.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("islands-data").textContent);
  const SIZE = 256; // canvas pixels per panel
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const state = { image: 0, column: 0, iteration: 0 };
  const cache = new Map();
  const $ = (id) => document.getElementById(id);
  let levelPanels = [];
  let shownSimilarities = [];

  function decodeBase64(text) {
    const raw = atob(text);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return bytes;
  }

  function decodeMasks(set) {
    return set ? Object.assign({}, set, { bytes: decodeBase64(set.bits) }) : null;
  }

  // One image's decoded similarity data (and, for vectors, their norms), its image element and masks; decoded once.
  function prepared(index) {
    if (cache.has(index)) return cache.get(index);
    const info = DATA.images[index];
    const values = new Int8Array(decodeBase64(info.similarities).buffer);
    const count = info.encoding === "vectors" ? info.states * info.levels * info.grid * info.grid : 0;
    const norms = new Float64Array(count);
    for (let v = 0; v < count; v++) {
      let sum = 0;
      for (let k = v * info.dim; k < (v + 1) * info.dim; k++) sum += values[k] * values[k];
      norms[v] = Math.sqrt(sum);
    }
    const image = new Image();
    const entry = { info, values, norms, image, loaded: false,
                    masks: decodeMasks(info.masks), groundTruth: decodeMasks(info.ground_truth) };
    image.onload = () => { entry.loaded = true; if (state.image === index) render(); };
    image.src = info.image;
    cache.set(index, entry);
    return entry;
  }

  // Cosine similarity of every column's level-`level` vector to the chosen column's, at state `t`.
  function similarities(entry, level, t, column) {
    const { info, values, norms } = entry, n = info.grid * info.grid, out = new Float64Array(n);
    if (info.encoding === "triangle") {
      const start = (t * info.levels + level) * (n * (n + 1) / 2);
      for (let j = 0; j < n; j++) {
        const a = Math.min(column, j), b = Math.max(column, j);
        out[j] = values[start + a * n - a * (a - 1) / 2 + b - a] / 127;
      }
      return out;
    }
    const vectors = values, d = info.dim, base = (t * info.levels + level) * n, a = (base + column) * d;
    for (let j = 0; j < n; j++) {
      const b = (base + j) * d;
      let dot = 0;
      for (let k = 0; k < d; k++) dot += vectors[a + k] * vectors[b + k];
      const scale = norms[base + column] * norms[base + j];
      out[j] = scale > 0 ? dot / scale : 0;
    }
    return out;
  }

  function colour(value) { // value in [0, 1] -> viridis
    const x = Math.min(1, Math.max(0, value)) * (VIRIDIS.length - 1), i = Math.min(VIRIDIS.length - 2, Math.floor(x));
    const f = x - i, [a, b] = [VIRIDIS[i], VIRIDIS[i + 1]];
    return `rgb(${a.map((c, k) => Math.round(c + f * (b[k] - c))).join(",")})`;
  }

  const cellName = (info, column) => `(${Math.floor(column / info.grid)}, ${column % info.grid})`;
  const stateName = (t) => (t === 0 ? "t0 (the learned initial levels)" : `t${t}`);
  const fmt = (x) => (x === null || x === undefined ? "n/a" : x.toFixed(3));

  function drawGrey(ctx, entry) {
    ctx.clearRect(0, 0, SIZE, SIZE);
    ctx.filter = "grayscale(1)";
    ctx.drawImage(entry.image, 0, 0, SIZE, SIZE);
    ctx.filter = "none";
  }

  function markColumn(ctx, info, column, radius) {
    const cell = SIZE / info.grid, x = (column % info.grid + 0.5) * cell, y = (Math.floor(column / info.grid) + 0.5) * cell;
    for (const [style, width] of [["#000", 4], ["#fff", 2]]) {
      ctx.beginPath();
      ctx.arc(x, y, radius, 0, 2 * Math.PI);
      ctx.strokeStyle = style;
      ctx.lineWidth = width;
      ctx.stroke();
    }
  }

  function drawInput(entry) {
    const { info } = entry, ctx = $("input-canvas").getContext("2d"), cell = SIZE / info.grid;
    ctx.clearRect(0, 0, SIZE, SIZE);
    ctx.drawImage(entry.image, 0, 0, SIZE, SIZE);
    ctx.strokeStyle = "rgba(255,255,255,0.45)";
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let i = 1; i < info.grid; i++) {
      ctx.moveTo(i * cell, 0); ctx.lineTo(i * cell, SIZE);
      ctx.moveTo(0, i * cell); ctx.lineTo(SIZE, i * cell);
    }
    ctx.stroke();
    const r = Math.floor(state.column / info.grid), c = state.column % info.grid;
    ctx.strokeStyle = "#ff2d55";
    ctx.lineWidth = 3;
    ctx.strokeRect(c * cell + 1.5, r * cell + 1.5, cell - 3, cell - 3);
    $("input-caption").textContent = `input (what the model saw), ${info.grid} x ${info.grid} columns; chosen column ` +
      `${cellName(info, state.column)} (row, col)`;
  }

  // White lines around the cells at or above the threshold: the island.
  function outlineIsland(ctx, grid, sims, threshold) {
    const cell = SIZE / grid, inside = (r, c) => r >= 0 && c >= 0 && r < grid && c < grid && sims[r * grid + c] >= threshold;
    ctx.beginPath();
    for (let r = 0; r < grid; r++) {
      for (let c = 0; c < grid; c++) {
        if (!inside(r, c)) continue;
        if (!inside(r - 1, c)) { ctx.moveTo(c * cell, r * cell); ctx.lineTo((c + 1) * cell, r * cell); }
        if (!inside(r + 1, c)) { ctx.moveTo(c * cell, (r + 1) * cell); ctx.lineTo((c + 1) * cell, (r + 1) * cell); }
        if (!inside(r, c - 1)) { ctx.moveTo(c * cell, r * cell); ctx.lineTo(c * cell, (r + 1) * cell); }
        if (!inside(r, c + 1)) { ctx.moveTo((c + 1) * cell, r * cell); ctx.lineTo((c + 1) * cell, (r + 1) * cell); }
      }
    }
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = 2;
    ctx.stroke();
  }

  function buildLevelPanels(info) {
    const holder = $("level-maps");
    holder.textContent = "";
    levelPanels = [];
    for (let level = 0; level < info.levels; level++) {
      const figure = document.createElement("figure");
      figure.innerHTML = `<canvas class="level-map" width="${SIZE}" height="${SIZE}" data-level="${level}"></canvas>` +
        `<div class="bar"></div><div class="bar-labels"><span></span><span></span></div><figcaption></figcaption>`;
      const canvas = figure.querySelector("canvas");
      canvas.addEventListener("mousemove", (event) => hoverLevel(event, level));
      canvas.addEventListener("click", (event) => { state.column = columnAt(event); render(); });
      figure.querySelector(".bar").style.background = `linear-gradient(to right, ${VIRIDIS.map((c) => `rgb(${c})`).join(",")})`;
      holder.appendChild(figure);
      levelPanels.push({ canvas, labels: figure.querySelectorAll(".bar-labels span"), caption: figure.querySelector("figcaption") });
    }
  }

  function drawLevels(entry) {
    const { info } = entry, grid = info.grid, cell = SIZE / grid, threshold = Number($("threshold").value);
    shownSimilarities = [];
    levelPanels.forEach((panel, level) => {
      const sims = similarities(entry, level, state.iteration, state.column);
      shownSimilarities.push(sims);
      const stretch = $("scale").value === "stretch";
      const lo = stretch ? Math.min(...sims) : -1, hi = stretch ? Math.max(...sims) : 1, span = Math.max(hi - lo, 1e-9);
      const ctx = panel.canvas.getContext("2d");
      drawGrey(ctx, entry);
      ctx.globalAlpha = 0.78;
      sims.forEach((s, j) => {
        ctx.fillStyle = colour((s - lo) / span);
        ctx.fillRect((j % grid) * cell, Math.floor(j / grid) * cell, Math.ceil(cell), Math.ceil(cell));
      });
      ctx.globalAlpha = 1;
      outlineIsland(ctx, grid, sims, threshold);
      markColumn(ctx, info, state.column, Math.max(3, cell / 4));
      const island = sims.filter((s) => s >= threshold).length;
      panel.labels[0].textContent = lo.toFixed(2);
      panel.labels[1].textContent = hi.toFixed(2);
      panel.caption.textContent = `cosine similarity of level ${level} vectors to column ${cellName(info, state.column)}, ` +
        `iteration ${state.iteration}; outlined: ${island} of ${grid * grid} columns at cosine >= ${threshold.toFixed(2)}`;
      panel.canvas.dataset.column = state.column;
      panel.canvas.dataset.iteration = state.iteration;
    });
  }

  // One mask of a set drawn over the grey image: the mask bright, the rest dimmed.
  function drawMask(ctx, entry, set, maskIndex) {
    drawGrey(ctx, entry);
    const { width, height } = set, overlay = new ImageData(width, height), offset = maskIndex * set.bytes_per_mask;
    for (let p = 0; p < width * height; p++) {
      const on = (set.bytes[offset + (p >> 3)] >> (7 - (p & 7))) & 1;
      overlay.data.set(on ? [255, 140, 0, 140] : [0, 0, 0, 150], 4 * p);
    }
    const layer = document.createElement("canvas");
    layer.width = width;
    layer.height = height;
    layer.getContext("2d").putImageData(overlay, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(layer, 0, 0, SIZE, SIZE);
    ctx.imageSmoothingEnabled = true;
  }

  function maskRow(label) {
    const row = document.createElement("div"), title = document.createElement("div");
    row.className = "row mask-row";
    title.className = "row-label";
    title.textContent = label;
    row.appendChild(title);
    return row;
  }

  function maskPanels(entry, set, label, what) {
    const { info } = entry, row = maskRow(label);
    set.level_names.forEach((name, level) => {
      const figure = document.createElement("figure"), canvas = document.createElement("canvas");
      canvas.width = canvas.height = SIZE;
      canvas.className = "mask-map";
      drawMask(canvas.getContext("2d"), entry, set, set.index[state.column][level]);
      markColumn(canvas.getContext("2d"), info, state.column, Math.max(3, SIZE / info.grid / 4));
      const caption = document.createElement("figcaption");
      caption.textContent = `${what} ${name} of point ${cellName(info, state.column)} (${set.source})`;
      figure.append(canvas, caption);
      row.appendChild(figure);
    });
    return row;
  }

  function drawMasks(entry) {
    const holder = $("mask-panels");
    holder.textContent = "";
    const teacher = "stage-1 masks of the chosen point: the regions whose embeddings each level was distilled from";
    if (entry.masks) holder.appendChild(maskPanels(entry, entry.masks, teacher, "stage-1"));
    else {
      const row = maskRow(teacher), note = document.createElement("p");
      note.className = "note";
      note.id = "no-masks";
      note.textContent = entry.info.masks_note;
      row.appendChild(note);
      holder.appendChild(row);
    }
    if (entry.groundTruth) {
      holder.appendChild(maskPanels(entry, entry.groundTruth, "the toy set's ground truth under the chosen point", "ground truth:"));
    }
  }

  function drawScores(entry) {
    const { info } = entry, holder = $("scores"), last = info.states - 1;
    const sources = [["stage1_masks", "stage-1 masks"], ["ground_truth", "ground-truth parts/objects"]]
      .filter(([key]) => info.scores[key]);
    if (!sources.length) {
      holder.innerHTML = `<p class="note">No scores: ${info.masks_note}</p>`;
      return;
    }
    const levels = Object.keys(info.scores[sources[0][0]][0]).sort();
    let html = "<table><tr><th>against</th><th>iteration</th>" +
      levels.map((l) => `<th>L${l} pair_corr</th><th>L${l} ARI</th>`).join("") + "</tr>";
    for (const [key, label] of sources) {
      for (const t of state.iteration === last ? [last] : [state.iteration, last]) {
        const scores = info.scores[key][t];
        html += `<tr class="${t === state.iteration ? "current" : ""}"><td>${label}</td><td>${t === last ? `t${t} (final)` : `t${t}`}</td>` +
          levels.map((l) => `<td>${fmt(scores[l].pair_corr)}</td><td>${fmt(scores[l].ari)}</td>`).join("") + "</tr>";
      }
    }
    holder.innerHTML = html + "</table>";
  }

  function drawNotes(entry) {
    const { info } = entry;
    $("notes").textContent = `Each map: the cosine similarity between the chosen column's level-L vector and every column's ` +
      `level-L vector, at the chosen iteration (${info.dim}-d vectors; ${info.encoding === "vectors" ? "computed in this " +
      "page from the vectors, shipped as int8" : "computed in float64 when the page was written, shipped as int8"}; ` +
      `largest cosine error against the float vectors on this image: ${info.cosine_error.toFixed(4)}). ` +
      `${stateName(0)}: every column starts alike, so every map is uniform. Masks: the point's stage-1 masks (SAM's three ` +
      `nested masks, whose embeddings the levels were distilled from) and, on the toy set, its ground-truth regions. ` +
      `Scores (docs/islands.md): pair_corr = Pearson correlation of column-pair cosine similarity with mask IoU; ARI = ` +
      `average-linkage clusters of the columns vs mask segments; model level i against mask level min(i, 2); n/a where ` +
      `undefined (all columns alike). ${DATA.details}`;
  }

  function columnAt(event) {
    const info = DATA.images[state.image], rect = event.target.getBoundingClientRect();
    const col = Math.min(info.grid - 1, Math.max(0, Math.floor((event.clientX - rect.left) / rect.width * info.grid)));
    const row = Math.min(info.grid - 1, Math.max(0, Math.floor((event.clientY - rect.top) / rect.height * info.grid)));
    return row * info.grid + col;
  }

  function hoverLevel(event, level) {
    const info = DATA.images[state.image], column = columnAt(event), sims = shownSimilarities[level];
    if (!sims) return;
    $("hover-readout").textContent = `level ${level}, iteration ${state.iteration}: column ${cellName(info, column)} has cosine ` +
      `${sims[column].toFixed(3)} to column ${cellName(info, state.column)}`;
  }

  function render() {
    const entry = prepared(state.image);
    if (!entry.loaded) return; // the image's onload renders
    const { info } = entry;
    $("iteration").max = info.states - 1;
    $("iteration").value = state.iteration;
    $("iteration-label").textContent = `${stateName(state.iteration)} of ${info.states - 1}`;
    $("threshold-label").textContent = Number($("threshold").value).toFixed(2);
    if (levelPanels.length !== info.levels) buildLevelPanels(info);
    drawInput(entry);
    drawLevels(entry);
    drawMasks(entry);
    drawScores(entry);
    drawNotes(entry);
    document.body.dataset.rendered = `${state.image}:${state.column}:${state.iteration}`;
  }

  function chooseImage(index) {
    const info = DATA.images[index];
    state.image = index;
    state.iteration = info.states - 1; // the final state first
    state.column = Math.floor(info.grid / 2) * info.grid + Math.floor(info.grid / 2);
    render();
  }

  function moveColumn(event) {
    const info = DATA.images[state.image], steps = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    if (!steps[event.key] || event.target.tagName === "SELECT" || event.target.tagName === "INPUT") return;
    const r = Math.min(info.grid - 1, Math.max(0, Math.floor(state.column / info.grid) + steps[event.key][0]));
    const c = Math.min(info.grid - 1, Math.max(0, state.column % info.grid + steps[event.key][1]));
    state.column = r * info.grid + c;
    event.preventDefault();
    render();
  }

  function setUp() {
    $("heading").textContent = DATA.heading;
    DATA.images.forEach((info, i) => $("image-picker").add(new Option(`${i + 1}. ${info.title}`, String(i))));
    $("image-picker").addEventListener("change", (event) => chooseImage(Number(event.target.value)));
    $("iteration").addEventListener("input", (event) => { state.iteration = Number(event.target.value); render(); });
    $("scale").addEventListener("change", render);
    $("threshold").addEventListener("input", render);
    $("input-canvas").addEventListener("click", (event) => { state.column = columnAt(event); render(); });
    $("input-canvas").addEventListener("mousemove", (event) => {
      const column = columnAt(event);
      if ($("follow-mouse").checked && column !== state.column) { state.column = column; render(); }
      $("hover-readout").textContent = `column ${cellName(DATA.images[state.image], column)}: click to choose it`;
    });
    document.addEventListener("keydown", moveColumn);
    chooseImage(0);
  }

  window.islandsExplorer = {
    state: () => Object.assign({}, state),
    imageCount: DATA.images.length,
    // The numbers behind level `level`'s map as shown now (the chosen column and iteration).
    similarities: (level) => Array.from(shownSimilarities[level] || []),
    select: (changes) => {
      if (changes.image !== undefined && changes.image !== state.image) {
        $("image-picker").value = String(changes.image);
        chooseImage(changes.image);
      }
      Object.assign(state, { column: changes.column ?? state.column, iteration: changes.iteration ?? state.iteration });
      render();
    },
  };
  setUp();
})();
