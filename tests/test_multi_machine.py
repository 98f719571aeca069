"""The multi-machine guide (examples/multi-machine/README.md), run with each host a network namespace.

etcd, two discovery servers and two teachers each run in a "host" of their own; the student runs
here. One teacher's link is cut and one discovery server killed in the middle of an epoch: every
sample still arrives once, in order, with the teacher's output for it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_for
from netns_support import NetnsHosts, netns_available

from distill_reader import DistillReader

REASON = netns_available()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=REASON or ""), pytest.mark.timeout(180)]
DISTILL = str(Path(sys.executable).parent / "distill")
STORE, DISC_A, DISC_B, GPU1, GPU2 = range(5)


class Cluster:
    def __init__(self, hosts: NetnsHosts) -> None:
        self.hosts = hosts
        self.processes: dict[str, subprocess.Popen] = {}

    def run(self, name: str, host: int, command: str) -> None:
        """Start a guide command on ``host``, with the guide's host names replaced by addresses."""
        names = dict(zip(["STORE", "DISC_A", "DISC_B", "GPU1", "GPU2"], self.hosts.addresses))
        for placeholder, address in names.items():
            command = command.replace(placeholder, address)
        argv = [DISTILL if word == "distill" else word for word in command.split()]
        self.processes[name] = subprocess.Popen(
            self.hosts.command(host, *argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def kill(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(10)

    def stop_all(self) -> None:
        for name in self.processes:
            self.kill(name)


def status(address: str) -> dict:
    out = subprocess.run(
        [DISTILL, "discovery", "status", "--discovery", f"{address}:7400", "--json"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    return json.loads(out)["services"].get("digits", {"teachers": [], "students": []})


def test_the_multi_machine_guide(tmp_path):
    from distill_reader.demo.digits import load_digits_split, train_teacher, write_onnx

    data = load_digits_split()
    weights = train_teacher(data, hidden=32)
    model = write_onnx(weights, tmp_path / "digits.onnx")
    with NetnsHosts(5) as hosts:
        cluster = Cluster(hosts)
        try:
            a = hosts.addresses
            cluster.run(
                "etcd",
                STORE,
                f"etcd --data-dir {tmp_path}/etcd --listen-client-urls http://STORE:2379 "
                "--advertise-client-urls http://STORE:2379 --log-level error",
            )
            wait_for(
                lambda: b"true" in urllib.request.urlopen(f"http://{a[STORE]}:2379/health", timeout=1).read(),
                30,
                "etcd ready",
            )
            cluster.run(
                "disc-a",
                DISC_A,
                "distill discovery serve --listen DISC_A:7400 --store etcd://STORE:2379 --http DISC_A:7480",
            )
            cluster.run("disc-b", DISC_B, "distill discovery serve --listen DISC_B:7400 --store etcd://STORE:2379")
            for name, host in (("gpu1", GPU1), ("gpu2", GPU2)):
                placeholder = name.upper()
                cluster.run(
                    name,
                    host,
                    f"distill teacher serve --model {model} --name digits "
                    f"--listen {placeholder}:8001 --register DISC_A:7400,DISC_B:7400 --service-name digits",
                )
            wait_for(
                lambda: len([t for t in status(a[DISC_B])["teachers"] if t["healthy"]]) == 2,
                60,
                "both teachers registered",
            )
            # The dashboard at / draws from /status.json: the teachers are there.
            page = urllib.request.urlopen(f"http://{a[DISC_A]}:7480/", timeout=5).read().decode()
            assert "status.json" in page
            fleet = json.loads(urllib.request.urlopen(f"http://{a[DISC_A]}:7480/status.json", timeout=5).read())
            assert f"{a[GPU1]}:8001" in json.dumps(fleet)

            config = tmp_path / "student.conf"
            config.write_text(
                "[conf]\nmode = discover\n"
                f"host = {a[DISC_A]}:7400, {a[DISC_B]}:7400\nservice_name = digits\nrequire_num = 2\n"
                "model_name = digits\n"
                "[feed]\nfeed_vars = ['pixels', 'label']\nfeed_types = ['float32', 'int64']\n"
                "feed_shapes = [(64,), (1,)]\npredict_feed_ids = [0]\n"
                "[fetch]\nfetch_vars = ['logits']\nfetch_types = ['float32']\nfetch_shapes = [(10,)]\n"
            )
            reader = DistillReader(
                config, 64, 8, capacity=8, occupied_capacity=1, copy=True, request_timeout=2, teacher_timeout=60
            )
            reader.set_sample_generator(lambda: ((x, np.array([y])) for x, y in zip(data.x_train, data.y_train)))
            expected = weights.logits(data.x_train)
            with reader:
                for epoch in range(2):
                    batches = []
                    for step, batch in enumerate(reader.distill_reader()()):
                        batches.append(batch)
                        if epoch == 1 and step == 3:
                            hosts.cut(GPU1)  # the cable of one GPU host is pulled...
                            cluster.kill("disc-a")  # ...and a discovery server dies
                    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches])[:, 0], data.y_train)
                    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), data.x_train)
                    np.testing.assert_allclose(np.concatenate([b[2] for b in batches]), expected, rtol=1e-4, atol=1e-4)
            # The cut teacher's lease ends within TTL + the lag allowance (2 x TTL) of its last
            # keep-alive (docs/discovery.md): the epoch may well have ended sooner.
            wait_for(
                lambda: [t["endpoint"] for t in status(a[DISC_B])["teachers"] if t["healthy"]] == [f"{a[GPU2]}:8001"],
                20,
                "only the teacher whose link was not cut is left",
            )
        finally:
            cluster.stop_all()
