"""grain pipelines: deterministic, reshuffled per epoch, process-sharded, checkpointable."""

import numpy as np
import pytest

from weckd_jax.data import pipeline
from weckd_jax.data.types import ImageSet


def _data(n=20):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2)
    return ImageSet(
        images=images, labels=(np.arange(n) % 3).astype(np.int32), class_names=tuple("abc")
    )


def _ids(batch):
    return batch["image"][:, 0, 0, 0].tolist()


def test_batches_cover_each_epoch_once_and_reshuffle():
    data = _data(20)
    index = np.arange(20)
    ds = pipeline.train_pipeline(
        data,
        index,
        np.ones(20, bool),
        batch_size=5,
        total_steps=8,
        seed=0,
        process_index=0,
        process_count=1,
    )
    assert len(ds) == 8
    ids = [i for b in ds for i in _ids(b)]
    epoch1, epoch2 = ids[:20], ids[20:40]
    assert sorted(epoch1) == sorted(epoch2) == list(range(20))
    assert epoch1 != epoch2


def test_same_seed_same_order_other_seed_differs():
    data, index, mask = _data(), np.arange(20), np.ones(20, bool)
    kw = dict(batch_size=4, total_steps=5, process_index=0, process_count=1)
    a = [_ids(b) for b in pipeline.train_pipeline(data, index, mask, seed=1, **kw)]
    b = [_ids(b) for b in pipeline.train_pipeline(data, index, mask, seed=1, **kw)]
    c = [_ids(b) for b in pipeline.train_pipeline(data, index, mask, seed=2, **kw)]
    assert a == b and a != c


@pytest.mark.parametrize("processes", [2, 4])
def test_process_shards_assemble_the_single_process_batches(processes):
    data, index, mask = _data(), np.arange(3, 19), np.ones(16, bool)
    kw = dict(batch_size=8, total_steps=6, seed=0)
    single = [
        _ids(b)
        for b in pipeline.train_pipeline(data, index, mask, **kw, process_index=0, process_count=1)
    ]
    shards = [
        pipeline.train_pipeline(data, index, mask, **kw, process_index=p, process_count=processes)
        for p in range(processes)
    ]
    for s in range(6):
        assembled = [i for p in range(processes) for i in _ids(shards[p][s])]
        assert assembled == single[s]
    # Each process only ever sees its share.
    assert all(len(_ids(shards[p][0])) == 8 // processes for p in range(processes))


def test_unlabelled_examples_get_label_minus_one_and_mask_zero():
    data = _data(10)
    index = np.arange(10)
    mask = np.arange(10) % 2 == 0
    ds = pipeline.train_pipeline(
        data, index, mask, batch_size=10, total_steps=1, seed=0, process_index=0, process_count=1
    )
    batch = ds[0]
    ids = np.array(_ids(batch))
    np.testing.assert_array_equal(batch["label_mask"], (ids % 2 == 0).astype(np.float32))
    np.testing.assert_array_equal(batch["label"], np.where(ids % 2 == 0, ids % 3, -1))


def test_iterator_state_resumes_exactly():
    data, index, mask = _data(), np.arange(20), np.ones(20, bool)
    ds = pipeline.train_pipeline(
        data, index, mask, batch_size=4, total_steps=10, seed=0, process_index=0, process_count=1
    )
    it = iter(ds.to_iter_dataset())
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = [_ids(b) for b in it]
    resumed = iter(ds.to_iter_dataset())
    resumed.set_state(state)
    assert [_ids(b) for b in resumed] == rest


def test_eval_batches_pad_the_last_batch():
    data = _data(10)
    out = list(pipeline.eval_batches(data.images, np.arange(10), batch_size=4))
    assert [valid for _, valid in out] == [4, 4, 2]
    assert all(images.shape[0] == 4 for images, _ in out)
    assert out[-1][0][:2, 0, 0, 0].tolist() == [8, 9]


def test_a_train_checkpoint_of_two_processes_resumes_in_one(tmp_path):
    # Each process of a multi-host run writes its own iterator file (process_<i>-of-<n>.json);
    # a run resumed on another number of hosts (one lost, or a bigger node) must find its place.
    import types

    from weckd_jax import checkpoints

    data, index, mask = _data(), np.arange(20), np.ones(20, bool)
    ds = pipeline.train_pipeline(
        data, index, mask, batch_size=4, total_steps=10, seed=0, process_index=0, process_count=1
    )
    state = types.SimpleNamespace(
        params={"w": np.arange(3.0, dtype=np.float32)}, batch_stats={}, opt_state={}
    )
    it = iter(ds.to_iter_dataset())
    for _ in range(3):
        next(it)
    with checkpoints.TrainCheckpoints(str(tmp_path), "link_1") as saver:
        saver.save(3, state, {"params": state.params}, {"best_epoch": 1}, it)
    rest = [_ids(b) for b in it]
    folder = tmp_path / "checkpoints" / "link_1" / "train" / "3" / "data_iter"
    (written,) = folder.glob("process_*.json")
    for p in range(2):  # as processes 0 and 1 of two write them
        (folder / f"process_{p}-of-2.json").write_text(written.read_text())
    written.unlink()

    resumed = iter(ds.to_iter_dataset())
    with checkpoints.TrainCheckpoints(str(tmp_path), "link_1") as saver:
        arrays, best, meta = saver.restore(3, state, {"params": state.params}, resumed)
    assert [_ids(b) for b in resumed] == rest
    np.testing.assert_array_equal(arrays["params"]["w"], [0.0, 1.0, 2.0])
    assert meta == {"best_epoch": 1}
