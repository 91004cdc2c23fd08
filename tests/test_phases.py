"""compress announces every phase as it starts (no silent minutes) and reports how long each took."""

from __future__ import annotations

from lowrank_attn.compression import compress
from lowrank_attn.models import load_model
from lowrank_attn.recipe import Recipe


def test_compress_announces_and_times_every_phase(public_text, capsys):
    recipe = Recipe(model="tiny-llama", text=[public_text], seq_len=128, max_tokens=1024, heldout_tokens=256,
                    v_rank_ratio=0.5)
    _, report = compress(load_model("tiny-llama"), recipe, progress=True)
    phases = ["text", "statistics", "fit", "values", "allocation", "certificate", "install"]
    assert list(report["timings_s"]) == phases
    assert all(t >= 0 for t in report["timings_s"].values())
    err = capsys.readouterr().err
    positions = [err.index(f"[compress] {p}") for p in phases]
    assert positions == sorted(positions)
    assert all(f"[compress] {p} took " in err for p in phases)  # each phase's time, as it ends
