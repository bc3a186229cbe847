import numpy as np
import pytest

from shm.region import ShmError
from shm.snapshot import SnapshotReader, SnapshotWriter
from tests.shm_workers import children, shm_prefix, wait_for  # noqa: F401  (fixtures)


def test_readers_never_see_a_torn_table(shm_prefix, children):
    name = shm_prefix + "-snap"
    reads = 3000
    stop = children.event()
    children.start("snapshot_writer", name, stop)
    wait_for(lambda: _exists(name), 30, "the writer to create the snapshot")
    for _ in range(2):
        children.start("snapshot_reader", name, reads)
    reports = children.collect(2, timeout_s=60)
    stop.set()
    [(_, last_version)] = children.collect(1, timeout_s=30)
    for _, n, distinct, retries in reports:
        assert n == reads
        assert distinct >= 50, f"only {distinct} distinct versions in {reads} reads: reads did not overlap publishing"
    assert sum(r[3] for r in reports) > 0, "no read ever caught the writer mid-publish: the test proved nothing"
    print(f"\nwriter published {last_version} versions; readers saw {[r[2] for r in reports]} of them, "
          f"retried {[r[3] for r in reports]} times")


def _exists(name):
    try:
        SnapshotReader.attach(name).close()
    except ShmError:
        return False
    return True


def test_publish_and_read_in_process(shm_prefix):
    spec = {"a": (np.int64, 4), "b": (np.dtype([("x", "<i4"), ("y", "<f8")]), (2, 3))}
    with SnapshotWriter.create(shm_prefix + "-s", spec) as writer, SnapshotReader.attach(shm_prefix + "-s") as reader:
        version, tables = reader.read()
        assert version == 0 and not tables["a"].any() and tables["b"].shape == (2, 3)
        b = np.zeros((2, 3), spec["b"][0])
        b["x"] = 5
        assert writer.publish({"a": np.arange(4, dtype=np.int32), "b": b}) == 1
        version, tables = reader.read()
        assert version == 1 and tables["a"].tolist() == [0, 1, 2, 3] and (tables["b"]["x"] == 5).all()
        tables["a"][:] = -1  # a copy: scribbling on it changes nothing shared
        assert writer.publish(lambda t: (t["a"].fill(9), t["b"].fill(0))) == 2
        assert reader.read()[1]["a"].tolist() == [9, 9, 9, 9] and writer.version == 2
        with pytest.raises(ValueError, match="exactly the tables"):
            writer.publish({"a": np.zeros(4, np.int64)})
        with pytest.raises(TypeError):
            writer.publish({"a": np.zeros(4, np.float64), "b": b})


def test_reader_of_missing_snapshot_fails_clearly(shm_prefix):
    with pytest.raises(ShmError, match="does not exist — is the exchange running"):
        SnapshotReader.attach(shm_prefix + "-none")
