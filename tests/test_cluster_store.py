"""No shared filesystem: `curate run --ray-address` on a two-node Ray cluster (ray.cluster_utils)
with the inputs and OUT_DIR both on a local S3 endpoint (moto in server mode, started and
stopped by the fixture). Each node gets its own temporary folder (TMPDIR of its raylet, which
its workers inherit); the driver runs in an empty working folder. Afterwards: the scores equal
a local run's, the store holds exactly the files the ledger lists, each node's workers fetched
every source they split, once, into that node's temporary folder (run.json's `nodes`), which
holds none of this tool's files now, and nothing was written locally."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import pytest

from curation.cli import main as curate
from curation.config import load_config
from curation.runner import run_local, run_pipeline
from curation.writer import STAGE_SECONDS_PREFIX, OutputStore
from s3_server import s3_environment

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["split.min_duration_s=1.0", "run.sources_per_unit=1"]


def comparable(out) -> dict[tuple, dict]:
    """(file name, start_frame) -> every measured column (not the ids and paths, which name
    the source's location, nor the busy seconds)."""
    def same(v, path):
        if isinstance(v, str):  # an error message names the source where it was read
            return v.replace(path, path.rsplit("/", 1)[-1])
        return "nan" if isinstance(v, float) and v != v else v

    rows = OutputStore(out).read_scores().to_pylist()
    return {(r["source_path"].rsplit("/", 1)[-1], r["start_frame"]): {
        k: same(v, r["source_path"]) for k, v in r.items()
        if not k.startswith(STAGE_SECONDS_PREFIX) and k not in ("source_path", "source_id", "clip_id", "unit_id")}
        for r in rows}


def tool_files(folder: Path) -> list[Path]:
    """What this tool leaves in a temporary folder: fetch copies, staged files, logs."""
    return [p for p in folder.iterdir() if p.name.startswith("curate-")]


@pytest.fixture
def store(tmp_path):
    with s3_environment(tmp_path, "testing-secret-value", ("footage", "out")) as fs:
        yield fs


def test_two_nodes_without_a_shared_filesystem(store, footage, tmp_path, ray_tmp, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    root, _ = footage
    for path in sorted(root.iterdir()):
        store.put_file(str(path), f"footage/raw/{path.name}")
    local = tmp_path / "local"
    run_pipeline(load_config(REPO / "configs" / "spine.yaml", OVERRIDES), [str(root)], local, run_local)

    node_tmp = {name: tmp_path / f"tmp-{name}" for name in ("head", "worker")}
    for folder in node_tmp.values():
        folder.mkdir()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 80 * 2**20, "temp_dir": ray_tmp,
        "env_vars": {"TMPDIR": str(node_tmp["head"])}})
    worker = cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20,
                              env_vars={"TMPDIR": str(node_tmp["worker"])})
    cluster.wait_for_nodes()
    node_ids = {"head": cluster.head_node.node_id, "worker": worker.node_id}
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    monkeypatch.chdir(driver_dir)
    driver_tmp = tmp_path / "tmp-driver"
    driver_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(driver_tmp))
    try:
        args = ["run", str(REPO / "configs" / "spine.yaml"), "--input", "s3://footage/raw/",
                "--output", "s3://out/cluster/", "--ray-address", cluster.address]
        for o in OVERRIDES:
            args += ["--set", o]
        assert curate(args) == 0
        nodes = len(ray.nodes())
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    assert nodes == 2

    assert comparable("s3://out/cluster/") == comparable(local)
    out = OutputStore("s3://out/cluster/")
    assert out.read_run()["status"] == "complete"
    for kind in ("scores", "shards", "clips"):
        stored = sorted(p.split("/")[-1] for p in store.find(f"out/cluster/{kind}", refresh=True))
        assert stored == sorted(p.name for p in out.committed_files(kind)), kind
    assert store.find("out/cluster/logs", refresh=True)  # the driver's log, uploaded
    # Nothing written where the driver runs. Each node's workers fetched each source they split
    # (the sources in the scores that its units' ledger entries list) once, into that node's own
    # temporary folder, which holds none of this tool's files now.
    assert not list(driver_dir.iterdir())
    assert not tool_files(driver_tmp)
    node_of_source = {sid: e["node_id"] for e in out.committed().values() for sid in e["source_ids"]}
    split = Counter(node_of_source[sid] for sid in set(out.read_scores().column("source_id").to_pylist()))
    nodes = out.read_run()["nodes"]
    assert set(nodes) == set(node_ids.values()), nodes
    for name, folder in node_tmp.items():
        n = nodes[node_ids[name]]
        assert n["fetch_temp_dirs"] == [str(folder)], (name, n)
        assert n["fetched_objects"] == split[node_ids[name]] >= 1, (name, n, split)
        assert not tool_files(folder), name
