"""Optimizer state and master weights kept in parts (rows of one weight per file), streamed by the update."""

import torch

from slowllama.bench.synthetic import bench_args
from slowllama.commands.finetune import finetune
from slowllama.data.windows import load_text
from slowllama.engine.chain import EngineConfig, OffloadedModel
from slowllama.engine.residency import staging_bytes, working_bytes
from slowllama.formats.meta import prepare_meta
from slowllama.model.tokenizer import load_tokenizer
from slowllama.optim.adamw import AdamW
from slowllama.settings import FinetuneSettings
from slowllama.store.state_parts import state_parts
from slowllama.store.store import Store

from conftest import ALICE, assert_one_line_error, committed_step, run_cli
from reference import assert_state_close, meta_model, store_state_dict, train_in_memory

quiet = dict(log=lambda m: None, emit=lambda m: None)
SMALL = 16384  # elements per part: wq whole, w1/w2/w3 and the embeddings in 4 parts each


def with_parts(store, elements: int):
    with Store.open(store, writable=True, log=lambda m: None) as s:
        s.update_manifest({"state_part_elements": elements})
    return store


def adamw(store, steps=3, **kw):
    s = FinetuneSettings(store=str(store), data=str(ALICE), device="cpu", eval_every=0, log_every=0, steps=steps,
                         batch_size=2, accumulate=2, seq_len=32, lr=1e-3, optimizer="adamw", weight_decay=0.1, **kw)
    return finetune(s, **quiet)


def whole_state(store, kind="optim") -> dict:
    s = Store.open(store)
    return {(name, k): t for name in s.expected_shapes for k, t in s.read_state(name, kind).items()}


def test_state_in_small_parts_equals_torch_adamw(tiny_fp32, store_fp32):
    adamw(with_parts(store_fp32, SMALL))
    model = meta_model(tiny_fp32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    train_in_memory(model, load_text(ALICE, load_tokenizer(store_fp32)), 3, 2, 2, 32, 1e-3, order="random",
                    optimizer=opt)
    assert_state_close(store_state_dict(store_fp32), model.state_dict())
    store = Store.open(store_fp32)
    parts = store.state_parts("layers.1")
    assert len(parts) > len(store.expected_shapes["layers.1"])  # some weights are cut into row ranges
    w1 = [p for p in parts if p.key == "feed_forward.w1.weight"]
    assert len(w1) == 4 and all(p.shape[0] < p.weight_shape[0] for p in w1)
    # each part is a file of its own: rows of the moments, and the step
    for part in w1:
        tensors = store.read(part.name, "optim")
        assert tuple(tensors["feed_forward.w1.weight.exp_avg"].shape) == part.shape and tensors["step"].item() == 3
        assert (store.path / store.file_info(part.name, "optim").file).name.startswith(f"{part.name}@")
    expected = opt.state[model.layers[1].feed_forward.w1.weight]["exp_avg_sq"]
    torch.testing.assert_close(store.read_state("layers.1")["feed_forward.w1.weight.exp_avg_sq"], expected,
                               rtol=1e-5, atol=1e-12)


def test_the_size_of_parts_changes_no_result(tiny_bf16, tmp_path):
    # bf16 weights with fp32 master weights and AdamW moments, both in parts: bit for bit the same results
    stores = {}
    for elements in (1 << 25, SMALL, 2000):
        store = with_parts(prepare_meta(tiny_bf16, tmp_path / str(elements), log=lambda m: None), elements)
        adamw(store, steps=2, master_weights="fp32")
        stores[elements] = store
    first = store_state_dict(stores[1 << 25])
    for elements in (SMALL, 2000):
        assert_state_close(store_state_dict(stores[elements]), first, rtol=0, atol=0)
        for kind in ("optim", "master"):
            assert_state_close(whole_state(stores[elements], kind), whole_state(stores[1 << 25], kind), rtol=0, atol=0)


def test_reads_follow_the_parts_in_order_of_use(store_fp32, monkeypatch):
    reads, original = [], Store.read
    monkeypatch.setattr(Store, "read", lambda self, name, kind="modules", alloc=None:
                        reads.append((kind, name)) or original(self, name, kind, alloc))
    store = Store.open(with_parts(store_fp32, SMALL))
    streaming = working_bytes(store.args, torch.float32, torch.float32, train=True, optimizer=AdamW(), batch_size=2,
                              seq_len=32, microbatches=2, part_elements=SMALL) + 300_000  # nothing stays resident
    adamw(store_fp32, steps=2, max_memory=str(streaming))  # step 2 reads the moments step 1 wrote
    last = ("optim", store.state_parts("tok_embeddings")[-1].name)
    step2 = reads[reads.index(("optim", "head#0")):reads.index(last) + 1]  # its backward pass
    backward = ["head", "layers.3", "layers.2", "layers.1", "layers.0", "tok_embeddings"]
    expected = [key for name in backward for key in
                [("modules", name)] + [("optim", p.name) for p in store.state_parts(name)]]
    got = [key for key in step2 if key in expected]
    # every part once, each module's parts right after its weights (those still resident are not read again)
    assert [k for k in got if k[0] == "optim"] == [k for k in expected if k[0] == "optim"]
    assert got == [k for k in expected if k in got]


def test_a_device_budget_below_a_modules_state_holds_one_part_at_a_time(tiny_fp32, tmp_path):
    reference = prepare_meta(tiny_fp32, tmp_path / "reference", log=lambda m: None)
    adamw(reference, steps=2)
    path = with_parts(prepare_meta(tiny_fp32, tmp_path / "store", log=lambda m: None), SMALL)
    store = Store.open(path, writable=True, log=lambda m: None)
    block = store.module_bytes("layers.0")
    state = 8 * block // 4  # a block's fp32 moments
    engine = OffloadedModel(store, EngineConfig(torch.device("cpu"), torch.float32, device_budget=block // 2),
                            optimizer=AdamW(weight_decay=0.1))
    for number in (1, 2):
        committed_step(store, engine, number, 1e-3)
    engine.pipe.close()
    store.close()
    # the module in use, its new weights and a part or two of state in flight: far below a block's moments
    largest_part = 8 * max(p.shape[0] * p.shape[-1] for p in store.state_parts("layers.0"))
    assert engine.device_budget.peak <= 2 * block + 4 * largest_part < block + state
    assert_state_close(store_state_dict(path), store_state_dict(reference), rtol=0, atol=0)


def test_a_store_with_whole_module_state_is_split_on_open(tiny_fp32, tmp_path):
    straight = prepare_meta(tiny_fp32, tmp_path / "straight", log=lambda m: None)
    adamw(straight, steps=3)
    path = prepare_meta(tiny_fp32, tmp_path / "store", log=lambda m: None)
    adamw(path, steps=2)
    # the layout before parts: one optim file per module, named by the module
    with Store.open(path, writable=True, log=lambda m: None) as store:
        for name in store.expected_shapes:
            store.write(name, store.read_state(name), "optim", gen=store.step)
        store.commit(store.step, remove=[("optim", p.name) for name in store.expected_shapes
                                         for p in store.state_parts(name)])
    assert set(Store.open(path).manifest.files["optim"]) == set(Store.open(path).expected_shapes)
    said = []
    Store.open(path, writable=True, log=said.append).close()
    assert said == ["split 6 files of optimizer state or master weights into parts (the store's new layout)"]
    store = Store.open(path)
    assert sorted(store.manifest.files["optim"]) == sorted(p.name for n in store.expected_shapes
                                                             for p in store.state_parts(n))
    assert {f.name.split("@")[0] for f in (path / "optim").iterdir()} == set(store.manifest.files["optim"])
    adamw(path, steps=3)  # resumes at step 3
    assert_state_close(store_state_dict(path), store_state_dict(straight), rtol=0, atol=0)
    assert_state_close(whole_state(path), whole_state(straight), rtol=0, atol=0)


def test_a_bad_part_size_in_the_manifest_is_refused(store_fp32):
    with_parts(store_fp32, 1 << 20)
    manifest = (store_fp32 / "manifest.json").read_text()
    (store_fp32 / "manifest.json").write_text(manifest.replace('"state_part_elements": 1048576', '"state_part_elements": 0'))
    assert_one_line_error(run_cli("finetune", store_fp32, "--data", ALICE, "--steps", 1),
                          "manifest.json", "state_part_elements", "positive integer")


def test_adamw_on_a_7b_block_fits_4g_host_and_8g_gpu():
    # the SSD-bound budgets of issue 5: a 7B step's working set, with its state streamed in parts
    args = bench_args("7b")
    work = working_bytes(args, torch.bfloat16, torch.bfloat16, train=True, optimizer=AdamW(), batch_size=16, seq_len=256)
    staging = staging_bytes(args, torch.bfloat16, AdamW(), False, 2, 2)
    # room left for resident modules and cached activations (a step's are 1 GiB at 16 x 256)
    assert work < 7 << 30 and staging < 3 << 30, (work / 2**30, staging / 2**30)
    largest = max(p.shape[0] * p.shape[-1] for p in state_parts("tok_embeddings", {"weight": (32000, 4096)}, 1 << 25))
    assert largest <= 1 << 25
