"""``python -m pipeline.bench evlgen``: every connector measured side by side, as JSON rows."""
import json

from pipeline.bench import main
from pipeline.bench.evlgen import CONNECTORS as EVLGEN_CONNECTORS


def test_bench_evlgen_rows(capsys):
    assert main(["evlgen", "--size", "tiny", "--json"]) == 0
    rows = {r["connector"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]}
    assert set(rows) == set(EVLGEN_CONNECTORS)
    for r in rows.values():
        assert {"connector", "prompt_tokens", "flops", "trainable_params", "activation_bytes"} <= set(r)
        # the phase split (frozen ViT / connector / frozen LLM) accounts for the whole step
        assert r["flops_vision"] + r["flops_connector"] + r["flops_llm"] == r["flops"]
        assert r["trainable_params"] > 0 and r["activation_bytes"] > 0
    assert [rows[c]["prompt_tokens"] for c in EVLGEN_CONNECTORS] == [29, 29, 32, 257]
    assert len({r["flops_vision"] for r in rows.values()}) == 1  # the same frozen ViT everywhere
    for merged in ("tomeformer-mean", "tomeformer-weighted"):
        r = rows[merged]
        assert r["flops_connector"] < rows["none"]["flops_connector"] and r["flops_llm"] < rows["none"]["flops_llm"]
        assert r["activation_bytes"] < rows["none"]["activation_bytes"]
        assert r["trainable_params"] == rows["none"]["trainable_params"]  # merging adds no parameters
