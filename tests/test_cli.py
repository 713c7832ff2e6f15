"""The command line: demo (the main job), chat, make-tiny-checkpoint, bench — run through click in-process."""
import json

import pytest
from click.testing import CliRunner

from segllm_edge.cli import main


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def test_make_tiny_checkpoint_and_refuse_overwrite(runner, tmp_path):
    out = tmp_path / "ck"
    r = runner.invoke(main, ["make-tiny-checkpoint", str(out), "--hidden", "64", "--heads", "2", "--layers", "1",
                             "--clip-hidden", "64", "--clip-layers", "1", "--shards", "2"])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    r = runner.invoke(main, ["make-tiny-checkpoint", str(out)])
    assert r.exit_code != 0 and "not empty" in r.output


def test_demo_runs_three_rounds_and_writes_overlays(runner, tmp_path, golden_ckpt):
    r = runner.invoke(main, ["demo", "--checkpoint", str(golden_ckpt), "--workdir", str(tmp_path),
                             "--json", str(tmp_path / "t.json")])
    assert r.exit_code == 0, r.output
    assert "round 3:" in r.output and "per-stage latency" in r.output
    assert sorted(p.name for p in (tmp_path / "overlays").glob("*overlay.png")) == [
        "round1_overlay.png", "round2_overlay.png", "round3_overlay.png"]
    from PIL import Image

    legend = Image.open(tmp_path / "overlays" / "all_rounds.png")   # every round with a legend strip below
    assert legend.width == 640 and legend.height > 480
    rows = json.loads((tmp_path / "t.json").read_text())
    assert len(rows) == 3 and all(x["total"] > 0 for x in rows)


def test_chat_reports_bad_input_clearly(runner, golden_ckpt, tmp_path):
    r = runner.invoke(main, ["chat", "--checkpoint", str(golden_ckpt), "--image", str(tmp_path / "none.png"), "q"])
    assert r.exit_code != 0 and "image file not found" in r.output
    r = runner.invoke(main, ["chat", "--checkpoint", str(tmp_path / "nock"), "--image", str(tmp_path), "q"])
    assert r.exit_code != 0 and "no such checkpoint" in r.output


def test_help_lists_commands(runner):
    r = runner.invoke(main, ["--help"])
    for cmd in ("demo", "chat", "make-tiny-checkpoint", "bench"):
        assert cmd in r.output
