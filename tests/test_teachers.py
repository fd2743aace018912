"""The stage-1 teacher registry (``teachers.py``) and the import layering of ``src/``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from partwhole.common.errors import InputError, SettingError
from partwhole.masks import teachers
from partwhole.masks.masker_options import MaskerOptions
from partwhole.masks.sam2_points import Sam2PointGridMasker
from partwhole.masks.sam_attention import attention_of
from partwhole.masks.sam_points import PointGridMasker

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def test_the_readme_holds_the_registry_table():
    assert teachers.markdown_table("`--sam_model_type`") in (REPO / "README.md").read_text()


def test_every_teacher_is_named_once_and_the_released_files_are_told_apart():
    assert teachers.DEFAULT_MODEL_TYPE == "vit_h"
    assert teachers.default_checkpoint("vit_h") == "sam_vit_h_4b8939.pth"
    assert teachers.default_checkpoint("sam2.1_hiera_large") == "sam2.1_hiera_large.pt"
    assert set(teachers.TEST_MODEL_TYPES) == {"vit_tiny", "sam2.1_hiera_test"}
    signatures = [t.signature for t in teachers.TEACHERS.values() if t.signature is not None]
    assert len(signatures) == len(set(signatures))  # a file's layout names one teacher
    with pytest.raises(InputError, match="^sam_model_type='vit_x': unknown; choose one of"):
        teachers.get_teacher("vit_x")


@pytest.mark.parametrize("name, masker", [("vit_tiny", PointGridMasker), ("sam2.1_hiera_test", Sam2PointGridMasker)])
def test_a_built_teacher_is_recognised_by_its_checkpoint_and_gets_its_masker(name, masker):
    model = teachers.build_teacher(name, seed=3)
    assert teachers.guess_model_type(model.state_dict()) == name
    assert teachers.guess_model_type({"model": model.state_dict()}) == name  # as SAM 2.1 releases them
    again = teachers.build_teacher(name, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    built = teachers.build_masker(name, None, "cpu", MaskerOptions(img_size=64, patch_size=16))
    assert type(built) is masker and built.num_points == 16


def test_options_a_family_lacks_are_refused_and_sam1_takes_its_attention():
    teachers.check_options("vit_tiny", MaskerOptions(point_labels="reference", attention="reference", compile_encoder=True))
    with pytest.raises(SettingError, match="^attention='reference': is for SAM 1's image encoder; SAM 2.1 always uses"):
        teachers.check_options("sam2.1_hiera_test", MaskerOptions(attention="reference"))
    with pytest.raises(SettingError, match="^compile_encoder=True: torch.compile is not supported for SAM 2.1 yet"):
        teachers.build_masker("sam2.1_hiera_test", None, "cpu", MaskerOptions(img_size=64, patch_size=16, compile_encoder=True))
    with pytest.raises(SettingError, match="^box_sizes='8,24,56': only the boxes mask source takes box sides, not SAM 1"):
        teachers.check_options("vit_tiny", MaskerOptions(box_sizes=(8, 24, 56)))
    assert attention_of(teachers.build_teacher("vit_tiny", attention="reference")) == "reference"


def local_imports(path: Path) -> set[str]:
    """The modules of ``src/`` that ``path`` imports (anywhere in the file, lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if (SRC / Path(*n.split("."))).with_suffix(".py").is_file()}


def test_src_has_no_import_cycle_and_stage_3_never_imports_a_stage_runner():
    modules = {".".join(p.relative_to(SRC).with_suffix("").parts): p for p in SRC.rglob("*.py") if p.name != "__init__.py"}
    graph = {name: local_imports(path) for name, path in modules.items()}
    assert "partwhole.masks.teachers" in graph["partwhole_cli.masks"]
    state: dict[str, str] = {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for dep in graph.get(name, ()):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join([*stack, name, dep])}"
            if dep not in state:
                visit(dep, [*stack, name])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])
    runners = {"partwhole.common.per_image_runner", "partwhole.masks.mask_folder", "partwhole_cli.masks", "partwhole.embeds.embed_folder"}
    for name, deps in graph.items():
        if name.startswith("partwhole.agglomerator."):
            assert not deps & runners, f"{name} imports {deps & runners}"

