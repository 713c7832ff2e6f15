"""An install with only ``.[cpu,serve]`` (no torch, no transformers) runs exports: built from this checkout into
a fresh venv once per run, then the golden conversation through onnxruntime, the profiler, the BLS round loop
in-process and the CLI, compared with the research code's outputs (tests/golden)."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import GOLDEN_QUESTIONS
from segllm_edge.pipeline.masks import mask_iou
from torch_free import lean_venv as lean_venv_build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lean_venv() -> Path:
    """A venv with ``pip install '.[cpu,serve]'`` from a clean copy of the checkout, built in the background from
    the start of the run (tests/torch_free/lean_venv.py)."""
    return lean_venv_build.wait()


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env


@pytest.fixture(scope="module")
def lean_run(lean_venv, golden_export, golden_image, tmp_path_factory):
    out = tmp_path_factory.mktemp("lean_out") / "run.npz"
    subprocess.run([str(lean_venv / "bin" / "python"), str(ROOT / "tests" / "torch_free" / "run_export.py"),
                    str(golden_export), str(golden_image), str(out)], check=True, env=_env(),
                   cwd=out.parent)  # not the checkout: the installed package must be the one imported
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def test_torch_and_transformers_are_not_installed(lean_run):
    info = json.loads(str(lean_run["info"]))
    assert info["missing"] == {"torch": True, "transformers": True}
    assert not info["torch_loaded"] and not info["transformers_loaded"]
    assert info["backend"] == "onnxruntime"          # inferred from the export folder
    assert "llm_prefill" in info["table"]             # the profiler's table


@pytest.mark.parametrize("r", [1, 2, 3])
def test_golden_conversation_matches_research_code(lean_run, golden_rounds, r):
    assert mask_iou(lean_run["model_masks"][r - 1], golden_rounds[r]["final_mask"]) >= 0.99
    assert int(lean_run["query_index"][r - 1]) == int(golden_rounds[r]["selected_fg_query_id_last"])


def test_bls_round_loop_in_process_gives_the_session_masks(lean_run):
    for r in range(len(GOLDEN_QUESTIONS)):
        assert np.array_equal(lean_run["bls_masks"][r], lean_run["masks"][r])


def test_cli_runs_an_export_and_names_the_extra_it_lacks(lean_venv, golden_export, golden_image, tmp_path):
    exe = str(lean_venv / "bin" / "segllm-edge")
    chat = subprocess.run([exe, "chat", "--export", str(golden_export), "--image", str(golden_image),
                           GOLDEN_QUESTIONS[0]], capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert chat.returncode == 0, chat.stderr
    repo = subprocess.run([exe, "triton-repo", "--export", str(golden_export), "--out", str(tmp_path / "repo")],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert repo.returncode == 0, repo.stderr
    assert (tmp_path / "repo" / "segllm" / "config.pbtxt").is_file()
    tiny = subprocess.run([exe, "make-tiny-checkpoint", str(tmp_path / "tiny")], capture_output=True, text=True,
                          env=_env(), cwd=tmp_path)
    assert tiny.returncode != 0 and "segllm-edge[export]" in tiny.stderr and "Traceback" not in tiny.stderr
