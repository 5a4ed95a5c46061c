"""The typed manifest writes back what it read: same keys, nesting and order, unknown fields kept."""

import json

from slowllama.store.manifest import Manifest, RunRecord
from slowllama.store.store import Store


def text(store) -> str:
    return (store / "manifest.json").read_text()


def test_a_manifest_reads_and_writes_back_the_same_json(store_fp32):
    assert json.dumps(Manifest.read(store_fp32).to_json(), indent=1) == text(store_fp32)


def test_a_commit_keeps_unknown_fields_and_adds_no_field_an_older_store_lacks(store_fp32):
    m = json.loads(text(store_fp32))
    del m["state_part_elements"]  # a store from before state parts
    m = {**{k: m[k] for k in ("format", "version", "model", "dtype")}, "from_a_newer_slowllama": {"x": [1, 2]},
         **{k: m[k] for k in ("source", "files", "step")}}
    (store_fp32 / "manifest.json").write_text(json.dumps(m, indent=1))
    with Store.open(store_fp32, writable=True, log=lambda line: None) as store:
        store.commit(0)
        assert json.loads(text(store_fp32)) == m and list(json.loads(text(store_fp32))) == list(m)
        store.commit(1, RunRecord(start_step=0, settings={"lr": 0.1}))
    after = json.loads(text(store_fp32))
    assert list(after) == [*m, "run"]  # the new field last, as a dict update puts it
    assert after["run"] == {"start_step": 0, "settings": {"lr": 0.1}} and after["step"] == 1
    assert after["from_a_newer_slowllama"] == {"x": [1, 2]}
    assert Store.open(store_fp32).run == RunRecord(0, {"lr": 0.1})
