"""Files -> tensors for stage 3: datasets, transforms and one LightningDataModule.

What a batch carries and how training images are augmented is the objective's choice
(:data:`~partwhole.agglomerator.objectives.OBJECTIVES`: ``needs_embeddings``, ``augmentation``). Every batch is a dict: ``image`` ``(b, c, H, W)`` (``(b, 2, c, H, W)`` for the
two-crop ``supcon`` objective), ``label`` ``(b,)``, ``index`` ``(b,)`` and, for an
objective that reads them (``sam_distill``), ``embeds`` ``(b, n, levels, D)`` from the stage-2 files (or, for a
split whose targets were precomputed in memory, ``targets`` ``(b, n, levels, k)``, what the
student regresses, and ``target_constants``, what its scores need).
Val (and test) batches of image folders whose ``<root>/val_masks`` exist also
carry ``masks``: a list of ``b`` entries, the stage-1 masks bool ``(n, 3, H, W)``
of the first ``val_masks_items`` images of the split (by index) and None for the
others (the islands scores of :mod:`partwhole.agglomerator.islands_callback` use them; at
224 px one image's masks are 30 MB, so only a few are loaded).

Datasets:
* image folders with stage-2 embeddings: ``IMAGENETTE`` (``datasets/imagenette2``)
  and the embedded ``TOY`` set (``datasets/toy``), each ``{train,val}/<class>/<img>``
  plus ``{train,val}_masks_embeds/<class>/<stem>.pkl`` (another teacher's files:
  ``embeds_suffix``); test = val, or, with ``val_from_train``, val = a seeded
  fraction of train (for tuning) and test = the val folder;
* ``IMAGENET`` (``datasets/imagenet/{train,val}``, an image folder);
* torchvision's ``CIFAR10``, ``CIFAR100``, ``MNIST``, ``FashionMNIST`` and
  ``smallNORB`` (our reader of the official files); val = a seeded 10 % of train,
  test = the official test split.

``sam_distill`` needs no labels: ``unlabelled_dir`` adds more images (another image folder
with its stage-2 embeddings) to its training split only (:class:`WithUnlabelled`).
"""

from __future__ import annotations

import bisect
import gzip
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, default_collate
from torchvision import transforms as T

from partwhole.agglomerator.objectives import OBJECTIVES, objective_class
from partwhole.common.errors import InputError, SettingError, check_choice
from partwhole.common.image_folders import (
    EMBEDS_SUFFIX,
    MASKS_SUFFIX,
    ImageRecord,
    list_image_folder,
    load_rgb_image,
)
from partwhole.common.mask_io import load_embeddings, load_masks
from partwhole.common.processes import (
    end_loader_workers_at_exit,
    ignore_stop_signals,
    shut_down_loader_workers,
)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZATION = {
    "IMAGENETTE": (IMAGENET_MEAN, IMAGENET_STD),
    "TOY": (IMAGENET_MEAN, IMAGENET_STD),
    "IMAGENET": (IMAGENET_MEAN, IMAGENET_STD),
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR100": ((129.3 / 255, 124.1 / 255, 112.4 / 255), (68.2 / 255, 65.4 / 255, 70.4 / 255)),
    "MNIST": ((0.5,), (0.5,)),
    "FashionMNIST": ((0.5,), (0.5,)),
    "smallNORB": ((0.5,), (0.5,)),
}
FOLDER_DATASETS = {"IMAGENETTE": "imagenette2", "TOY": "toy", "IMAGENET": "imagenet"}
TORCHVISION_DATASETS = ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST")
DATASETS = tuple(NORMALIZATION)


@dataclass
class DataConfig:
    """What the data module needs (plain values; the command line fills them from its flags)."""

    dataset: str = "IMAGENETTE"
    data_dir: str = "datasets"
    image_size: int = 224
    n_channels: int = 3
    batch_size: int = 32
    num_workers: int = 0
    objective: str = "sam_distill"  # a name of OBJECTIVES: what batches carry, how training images are augmented
    val_fraction: float = 0.1
    seed: int = 42
    crop_size: int | None = None  # smallNORB (reference): resize to image_size, then crop to crop_size
    embeds_suffix: str = EMBEDS_SUFFIX  # folder datasets: teacher embeddings in <root>/<split><embeds_suffix>
    val_from_train: float = 0.0  # folder datasets: >0 holds out this fraction of train as val; test = the val folder
    val_masks_items: int = 4  # the first val/test images that carry their stage-1 masks (when <root>/<folder>_masks exists)
    embeds_in_memory: bool = False  # read every split's embeddings once, at setup, instead of once per item and epoch
    unlabelled_dir: str = ""  # sam_distill: more training images <dir>/<folder>/<img>, embeddings in <dir><embeds_suffix>

    @property
    def root(self) -> Path:
        sub = FOLDER_DATASETS.get(self.dataset, self.dataset)
        return Path(self.data_dir) / sub


# --------------------------------------------------------------------------- transforms


class ToChannels:
    """PIL image -> mode with ``n`` channels (``L`` or ``RGB``)."""

    def __init__(self, channels: int):
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)


class TwoCrops:
    """Two independent augmentations of the same image, stacked: ``(2, c, H, W)``."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image):
        return torch.stack([self.transform(image), self.transform(image)])


def normalization(config: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel ``(mean, std)`` the transform normalises with, one value per ``n_channels``."""
    mean, std = NORMALIZATION[config.dataset]
    if len(mean) != config.n_channels:
        mean, std = (mean * config.n_channels)[: config.n_channels], (std * config.n_channels)[: config.n_channels]
    return tuple(mean), tuple(std)


def build_transform(config: DataConfig, train: bool) -> Callable:
    """The per-sample transform for a split.

    The objective's ``augmentation``: ``none`` (``sam_distill``: the teacher's embeddings are tied to the patch
    grid), ``two_crops`` (``supcon``: two crops of a random resized crop / flip / colour-jitter pipeline) or
    ``label_preserving`` (``classify``: RandAugment on torchvision datasets, as the reference, or a flip on image
    folders).
    """
    size = config.image_size
    mean, std = normalization(config)
    finish = [T.ToTensor(), T.Normalize(mean, std)]
    resize = T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)
    if config.crop_size is not None and config.crop_size < size:
        crop = T.RandomCrop(config.crop_size) if train else T.CenterCrop(config.crop_size)
        resize = T.Compose([resize, crop])
        size = config.crop_size
    channels = ToChannels(config.n_channels)
    augmentation = objective_class(config.objective).augmentation
    if not train or augmentation == "none":
        return T.Compose([channels, resize, *finish])
    if augmentation == "two_crops":
        augment = T.Compose([
            channels,
            T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            *finish,
        ])
        return TwoCrops(augment)
    if config.dataset in FOLDER_DATASETS:
        return T.Compose([channels, resize, T.RandomHorizontalFlip(), *finish])
    return T.Compose([channels, resize, T.RandAugment(), *finish])


# --------------------------------------------------------------------------- image folders


def collate_batch(items: list[dict]) -> dict:
    """``default_collate``, except ``masks`` (carried by a few items only): a list, one entry per item, None where absent."""
    masks = [item.get("masks") for item in items]
    batch = default_collate([{k: v for k, v in item.items() if k != "masks"} for item in items])
    if any(m is not None for m in masks):
        batch["masks"] = masks
    return batch


class ImageFolderWithEmbeddings(Dataset):
    """``<root>/<split>/<class>/<img>`` plus, optionally, the stage-2 embeddings and stage-1 masks.

    ``embeds_root`` (``<root>/<split>_masks_embeds``) holds ``<class>/<stem>.pkl``
    arrays ``(n, levels, D)``; with ``expected_embed_shape`` each one is checked on
    load (an error names the file). ``masks_root`` (``<root>/<split>_masks``): items
    with index below ``masks_items`` also carry ``masks``, their stage-1 masks
    bool ``(n, 3, H, W)`` (when the file exists); batch them with :func:`collate_batch`.
    ``records`` restricts it to some of the folder's images (a held-out part of train).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable, embeds_root: str | os.PathLike | None = None,
                 expected_embed_shape: tuple[int, int, int] | None = None, masks_root: str | os.PathLike | None = None,
                 masks_items: int = 0, records: list[ImageRecord] | None = None):
        self.root = Path(root)
        self.records: list[ImageRecord] = list_image_folder(self.root) if records is None else records
        if not self.records:
            raise InputError(f"{self.root}: no images found (expected <class>/<image> files)")
        self.classes = sorted({r.class_name for r in self.records})
        self.transform = transform
        self.embeds_root = Path(embeds_root) if embeds_root is not None else None
        self.expected_embed_shape = expected_embed_shape
        self.masks_root = Path(masks_root) if masks_root is not None else None
        self.masks_items = masks_items if masks_root is not None else 0

    def __len__(self) -> int:
        return len(self.records)

    def embeds_path(self, index: int) -> Path:
        return self.records[index].output_path(self.embeds_root)

    def check_embeddings(self) -> None:
        """Start-up check: every embedding file exists and the first has the expected shape."""
        missing = [self.embeds_path(i) for i in range(len(self)) if not self.embeds_path(i).is_file()]
        if missing:
            first = ", ".join(str(p) for p in missing[:3])
            raise InputError(
                f"{len(missing)} of {len(self)} embedding files missing under {self.embeds_root} (first: {first}); "
                f"run src/hierarchical_masks/masks_to_embeds.py for this split"
            )
        self._check_shape(load_embeddings(self.embeds_path(0)), self.embeds_path(0))

    def sample_embeddings(self, max_files: int = 500) -> np.ndarray:
        """The embeddings ``(N, n, l, D)`` of up to ``max_files`` images spread over the split (to fit the targets on)."""
        picks = np.unique(np.linspace(0, len(self) - 1, min(max_files, len(self))).round().astype(int))
        return np.stack([self.embeddings(int(i)) for i in picks])

    def load_all_embeddings(self, images: bool = False) -> None:
        """Read every item's embeddings into memory now (in the files' dtype: float16 files stay float16); with
        ``images``, also every transformed image (only for a deterministic transform: no augmentation)."""
        from tqdm import tqdm

        self._embeds, images_in_memory = [], []
        for i in tqdm(range(len(self)), desc=f"{self.root.name} into memory", leave=False):
            embeds = load_embeddings(self.embeds_path(i), dtype=None)
            self._check_shape(embeds, self.embeds_path(i))
            self._embeds.append(embeds)
            if images:
                images_in_memory.append(self.transform(load_rgb_image(self.records[i].path)))
        self._images = images_in_memory or None

    @torch.no_grad()
    def precompute_targets(self, space, batch: int = 64) -> None:
        """Replace the in-memory embeddings by what the student regresses, ``space(embeds)`` (a
        :class:`~partwhole.agglomerator.targets.TargetSpace`: normalised, maybe reduced), and what its scores need,
        ``space.constants(embeds)``: items then carry ``targets`` and ``target_constants`` instead of
        ``embeds``, computed once instead of in every step. Needs :meth:`load_all_embeddings` first."""
        if getattr(self, "_embeds", None) is None:
            raise RuntimeError("precompute_targets needs the embeddings in memory (load_all_embeddings)")
        targets, constants = [], []
        for start in range(0, len(self._embeds), batch):
            chunk = torch.from_numpy(np.stack(self._embeds[start:start + batch]))
            targets += list(space(chunk).float().unbind())
            values = space.constants(chunk)
            constants += [dict(zip(values, row)) for row in zip(*(v.unbind() for v in values.values()))]
        self._targets, self._constants, self._embeds = targets, constants, None

    def embeddings(self, index: int) -> np.ndarray:
        """Item ``index``'s embeddings ``(n, l, D)``: from memory after :meth:`load_all_embeddings`, else from its file."""
        if getattr(self, "_embeds", None) is not None:
            return self._embeds[index]
        path = self.embeds_path(index)
        embeds = load_embeddings(path)
        self._check_shape(embeds, path)
        return embeds

    def _check_shape(self, embeds: np.ndarray, path: Path) -> None:
        expected = self.expected_embed_shape
        if expected is not None and tuple(embeds.shape) != tuple(expected):
            n, levels, dim = expected
            raise InputError(
                f"{path}: embeddings have shape {tuple(embeds.shape)}, the model needs (num_patches={n}, levels={levels}, D={dim}); "
                f"make the model's grid (conv_image_size/patch_size)**2, levels and patch_dim (or levels_encoder_dim with "
                f"levels_encoder) match the stage-1/2 outputs"
            )

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        if getattr(self, "_images", None) is not None:
            image = self._images[index]
        else:
            image = self.transform(load_rgb_image(record.path))
        item = {"image": image, "label": record.label, "index": index}
        if getattr(self, "_targets", None) is not None:
            item["targets"], item["target_constants"] = self._targets[index], self._constants[index]
        elif self.embeds_root is not None:
            item["embeds"] = torch.from_numpy(self.embeddings(index))
        if index < self.masks_items:
            path = record.output_path(self.masks_root)
            if path.is_file():
                item["masks"] = torch.from_numpy(load_masks(path))
        return item


def held_out_count(members: int, fraction: float) -> int:
    """How many of a class's ``members`` train images ``val_from_train=fraction`` holds out: the rounded share, at
    least one, and never the whole class."""
    return min(max(1, int(round(members * fraction))), members - 1)


class WithUnlabelled(ConcatDataset):
    """sam_distill's training split with more images: the labelled split's items, then the unlabelled ones'.

    The targets are fitted on (and, in memory, precomputed for) both; ``records`` are the labelled split's
    (what the freeze mode exports as train).
    """

    def __init__(self, labelled: ImageFolderWithEmbeddings, unlabelled: ImageFolderWithEmbeddings):
        super().__init__([labelled, unlabelled])
        self.records = labelled.records

    def embeddings(self, index: int) -> np.ndarray:
        part = bisect.bisect_right(self.cumulative_sizes, index)
        return self.datasets[part].embeddings(index - (self.cumulative_sizes[part - 1] if part else 0))

    sample_embeddings = ImageFolderWithEmbeddings.sample_embeddings

    def precompute_targets(self, space, batch: int = 64) -> None:
        for part in self.datasets:
            part.precompute_targets(space, batch)


class TupleAsDict(Dataset):
    """Wrap a torchvision-style ``(image, label)`` dataset into our batch dicts."""

    def __init__(self, dataset: Dataset, transform: Callable, indices: list[int] | None = None):
        self.dataset, self.transform = dataset, transform
        self.indices = list(range(len(dataset))) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        image, label = self.dataset[self.indices[index]]
        return {"image": self.transform(image), "label": int(label), "index": index}


# --------------------------------------------------------------------------- smallNORB


class SmallNORB(Dataset):
    """smallNORB (LeCun et al. 2004) from its official binary files: 5 classes, 96x96 grey stereo pairs.

    Both cameras' images are samples (``2 x 24300`` per split), as in the reference.
    Files (``.mat`` or ``.mat.gz``) are read from ``<root>/raw`` and downloaded there
    with torchvision when the internet is reachable.
    """

    URL = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
    FILES = {
        "train": ("smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat", "smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat"),
        "test": ("smallnorb-5x01235x9x18x6x2x96x96-testing-dat.mat", "smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat"),
    }

    def __init__(self, root: str | os.PathLike, train: bool = True, download: bool = True):
        raw = Path(root) / "raw"
        dat_name, cat_name = self.FILES["train" if train else "test"]
        images = self._read(raw, dat_name, download)  # (24300, 2, 96, 96) uint8
        labels = self._read(raw, cat_name, download)  # (24300,) int32
        self.images = images.transpose(1, 0, 2, 3).reshape(-1, 96, 96)
        self.labels = np.concatenate([labels, labels]).astype(np.int64)

    @classmethod
    def _read(cls, raw: Path, name: str, download: bool) -> np.ndarray:
        path = next((p for p in (raw / name, raw / f"{name}.gz") if p.is_file()), None)
        if path is None and download:
            from torchvision.datasets.utils import download_url

            download_url(cls.URL + name + ".gz", str(raw), f"{name}.gz")
            path = raw / f"{name}.gz"
        if path is None:
            raise FileNotFoundError(raw / name)
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        magic, ndim = np.frombuffer(data[:8], dtype="<i4")
        dims = np.frombuffer(data[8 : 8 + 4 * max(3, ndim)], dtype="<i4")[:ndim]
        dtype = {0x1E3D4C55: np.uint8, 0x1E3D4C54: "<i4"}.get(int(magic) & 0xFFFFFFFF)
        if dtype is None:
            raise InputError(f"{path}: not a smallNORB file (magic {int(magic):#x})")
        return np.frombuffer(data, dtype=dtype, offset=8 + 4 * max(3, ndim)).reshape(tuple(dims))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return Image.fromarray(self.images[index], mode="L"), int(self.labels[index])


def _torchvision_split(config: DataConfig, train: bool) -> Dataset:
    from torchvision import datasets

    root = config.root
    try:
        if config.dataset == "smallNORB":
            return SmallNORB(root, train=train)
        cls = getattr(datasets, config.dataset)
        return cls(str(root), train=train, download=True)
    except InputError:
        raise
    except Exception as exc:  # torchvision raises URLError, RuntimeError, OSError... when offline
        raise InputError(
            f"{config.dataset} not found in {root} and could not be downloaded ({type(exc).__name__}: {exc}); "
            f"run once where the internet is reachable, or copy torchvision's {config.dataset} files into {root}"
        ) from None


# --------------------------------------------------------------------------- data module


def loader_worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: loader processes ignore SIGTERM/SIGUSR1, then Lightning's seeding.

    A cluster signals the whole process group; a loader process killed by it would end training with
    "DataLoader worker is killed" before ``PreemptionCheckpoint`` saves. The trainer decides when to
    stop and shuts the loaders down (``PartWholeDataModule.on_exception``, and
    :func:`end_loader_workers_at_exit` at exit); on Linux they die with the main process even when it
    is killed outright. Lightning adds its per-worker seeding only to loaders without a
    ``worker_init_fn``, so this one calls it (when ``seed_everything(workers=True)`` asked for it).
    """
    ignore_stop_signals(worker_id)
    if os.environ.get("PL_SEED_WORKERS") == "1":
        from lightning_fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


class PartWholeDataModule(pl.LightningDataModule):
    """One data module for every dataset; ``expected_embed_shape`` enables the teacher embeddings."""

    def __init__(self, config: DataConfig, expected_embed_shape: tuple[int, int, int] | None = None):
        super().__init__()
        if config.dataset not in DATASETS:
            raise SettingError("dataset", config.dataset, f"unknown; choose one of {', '.join(DATASETS)}")
        check_choice("objective", config.objective, OBJECTIVES)
        self.config = config
        self.expected_embed_shape = expected_embed_shape
        self.splits: dict[str, Dataset] = {}
        self._loaders: weakref.WeakSet[DataLoader] = weakref.WeakSet()  # those with worker processes

    @property
    def with_embeddings(self) -> bool:
        """Whether batches carry the stage-2 teacher embeddings (the objective reads them)."""
        return objective_class(self.config.objective).needs_embeddings

    def folder_split(self, split: str, train: bool, records: list[ImageRecord] | None = None,
                     with_masks: bool = False) -> ImageFolderWithEmbeddings:
        """The image-folder dataset of folder ``split`` (``train`` or ``val``) of IMAGENETTE/TOY/IMAGENET (or of some of its ``records``).

        With ``with_masks`` (the val and test splits), the first ``val_masks_items`` items carry their
        stage-1 masks when ``<root>/<split>_masks`` exists.
        """
        root = self.config.root
        masks_root = root / f"{split}{MASKS_SUFFIX}"
        with_masks = with_masks and self.config.val_masks_items > 0 and masks_root.is_dir()
        return self.image_folder(root / split, train, records, masks_root if with_masks else None)

    def image_folder(self, images: Path, train: bool, records: list[ImageRecord] | None = None,
                     masks_root: Path | None = None) -> ImageFolderWithEmbeddings:
        """The dataset of image folder ``images`` (with its embeddings ``<images><embeds_suffix>`` for sam_distill)."""
        embeds_root = images.with_name(images.name + self.config.embeds_suffix) if self.with_embeddings else None
        dataset = ImageFolderWithEmbeddings(images, build_transform(self.config, train), embeds_root,
                                            self.expected_embed_shape, masks_root=masks_root,
                                            masks_items=self.config.val_masks_items, records=records)
        if embeds_root is not None:
            dataset.check_embeddings()
            if self.config.embeds_in_memory:
                dataset.load_all_embeddings(images=True)  # sam_distill's transforms have no augmentation
        return dataset

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        c = self.config
        if c.unlabelled_dir and (not self.with_embeddings or c.dataset not in FOLDER_DATASETS):  # before any split is read
            raise SettingError("unlabelled_dir", c.unlabelled_dir, f"only sam_distill pretraining on an image-folder dataset "
                               f"uses unlabelled images (here: dataset {c.dataset}, objective {c.objective}); leave it empty")
        self._setup_splits()
        if c.unlabelled_dir:
            self.splits["train"] = WithUnlabelled(self.splits["train"], self.unlabelled_split())

    def unlabelled_split(self) -> ImageFolderWithEmbeddings:
        """``unlabelled_dir``: its images (labels unused, given as -1) and their embeddings, for sam_distill pretraining."""
        folder = Path(self.config.unlabelled_dir)
        records = [r._replace(label=-1) for r in list_image_folder(folder)]
        return self.image_folder(folder, train=True, records=records)

    def _setup_splits(self) -> None:
        c = self.config
        if c.dataset in FOLDER_DATASETS:
            if self.with_embeddings and c.dataset == "IMAGENET":
                raise SettingError("dataset", c.dataset, self.no_embeddings)
            if c.val_from_train > 0:
                train_records, val_records = self.hold_out(list_image_folder(c.root / "train"))
                self.splits["train"] = self.folder_split("train", train=True, records=train_records)
                self.splits["val"] = self.folder_split("train", train=False, records=val_records, with_masks=True)
                self.splits["test"] = self.folder_split("val", train=False, with_masks=True)
                return
            self.splits["train"] = self.folder_split("train", train=True)
            self.splits["val"] = self.folder_split("val", train=False, with_masks=True)
            self.splits["test"] = self.splits["val"]
            return
        if self.with_embeddings:
            raise SettingError("dataset", c.dataset, self.no_embeddings)
        train_full = _torchvision_split(c, train=True)
        order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(c.seed)).tolist()
        n_val = int(round(len(order) * c.val_fraction))
        self.splits["train"] = TupleAsDict(train_full, build_transform(c, train=True), order[n_val:])
        self.splits["val"] = TupleAsDict(train_full, build_transform(c, train=False), order[:n_val])
        self.splits["test"] = TupleAsDict(_torchvision_split(c, train=False), build_transform(c, train=False))

    @property
    def no_embeddings(self) -> str:
        return (f"has no stage-2 embeddings, which the {self.config.objective} objective reads: pretrain with supcon, "
                f"or fine-tune (classify)")

    def teacher_dim(self) -> int:
        """D of the teacher's embeddings in the train folder (its first file), before any split is set up."""
        c = self.config
        records = list_image_folder(c.root / "train")
        if not records:
            raise InputError(f"{c.root / 'train'}: no images found (expected <class>/<image> files)")
        path = records[0].output_path(c.root / f"train{c.embeds_suffix}")
        if not path.is_file():
            raise InputError(f"{path}: embedding file missing; run src/hierarchical_masks/masks_to_embeds.py for the train split")
        return int(load_embeddings(path).shape[-1])

    def hold_out(self, records: list[ImageRecord]) -> tuple[list[ImageRecord], list[ImageRecord]]:
        """Split train records into (train, val): a seeded ``val_from_train`` fraction of each class, in folder order."""
        c = self.config
        if not 0 < c.val_from_train < 1:
            raise SettingError("val_from_train", c.val_from_train, "give a fraction between 0 and 1 (0: val = the val folder)")
        rng = np.random.default_rng(c.seed)
        held = set()
        for label in sorted({r.label for r in records}):
            members = [i for i, r in enumerate(records) if r.label == label]
            held.update(rng.choice(members, size=held_out_count(len(members), c.val_from_train), replace=False).tolist())
        return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        workers = self.config.num_workers
        return self._track(DataLoader(
            self.splits[split],
            batch_size=self.config.batch_size,
            shuffle=shuffle,
            sampler=None if shuffle else self._eval_sampler(self.splits[split]),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_batch,
            worker_init_fn=loader_worker_init if workers > 0 else None,
        ))

    def _eval_sampler(self, dataset: Dataset):
        """Several processes: each evaluates every ``world_size``-th item, and no item twice.

        Lightning's default (a ``DistributedSampler``) pads the shards to equal length with repeated items,
        which would count those twice in every metric; shards may here differ by one item (evaluation
        needs no gradient all-reduce, and every logged value is reduced once, at the epoch's end).
        Training keeps Lightning's shuffling ``DistributedSampler``.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return None
        from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

        if len(dataset) < trainer.world_size:
            raise InputError(f"{len(dataset)} evaluation image(s) for {trainer.world_size} processes: each needs one at least")
        return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)

    def _track(self, loader: DataLoader) -> DataLoader:
        """Remember a loader with worker processes: they ignore SIGTERM (see :func:`loader_worker_init`)."""
        if loader.num_workers:
            end_loader_workers_at_exit()
            self._loaders.add(loader)
        return loader

    def on_exception(self, exception: BaseException) -> None:
        """A run ended on an exception (a stop signal, a full disk): end this module's loader processes now.

        Lightning's teardown shuts down only the active loop's loaders; stopped during validation, the
        training loader's persistent workers would stay alive until the process exits.
        """
        shut_down_loader_workers(list(self._loaders))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def eval_loader(self, split: str) -> DataLoader:
        """A non-shuffled loader with eval transforms for ``split`` (freeze mode)."""
        if split == "train" and self.config.dataset in FOLDER_DATASETS:
            dataset: Dataset = ImageFolderWithEmbeddings(self.config.root / "train", build_transform(self.config, train=False),
                                                         records=self.splits["train"].records)
        elif split == "train":
            base = self.splits["train"]
            dataset = TupleAsDict(base.dataset, build_transform(self.config, train=False), base.indices)
        else:
            dataset = self.splits[split]
        return self._track(DataLoader(dataset, batch_size=self.config.batch_size, shuffle=False, num_workers=self.config.num_workers,
                                      collate_fn=collate_batch,
                                      worker_init_fn=loader_worker_init if self.config.num_workers > 0 else None))

