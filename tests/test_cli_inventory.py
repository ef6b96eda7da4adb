"""GPU discovery through NVML (with an honest fake, checked against the real bindings) and
`gardenctl inventory`."""

from __future__ import annotations

import inspect
import json
import socket
import sys
from pathlib import Path
from textwrap import dedent

import pytest
from conftest import REPO
from fake_nvml import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_NOT_SUPPORTED,
    FakeGpu,
    FakeMemory,
    FakeNvml,
    FakeProcess,
    fake_surface,
)

from gardenctl.errors import InventoryError
from gardenctl.inventory.model import GpuProcess
from gardenctl.inventory.nvml import NvmlProbe, discover_local_gpus

GiB = 1024**3
L4_UUID = "GPU-4a1c7e10-0000-4000-8000-000000000001"


def two_gpus() -> FakeNvml:
    """An L4 (name as bytes, like old nvidia-ml-py) busy with two processes, and an idle A10G."""
    return FakeNvml([
        FakeGpu(b"NVIDIA L4", total=24 * GiB, used=3 * GiB, uuid=L4_UUID.encode(),
                compute=[FakeProcess(pid=4242, usedGpuMemory=2 * GiB),
                         FakeProcess(pid=77, usedGpuMemory=None)],
                graphics=[FakeProcess(pid=4242, usedGpuMemory=2 * GiB)]),
        FakeGpu("NVIDIA A10G", total=22 * GiB, uuid="GPU-a10g"),
    ])


def real_nvml_initialises() -> bool:
    """True on a machine where NVML works (a GPU and its driver): some tests then do not apply."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


# -- the fake against the real bindings ---------------------------------------------------------


def parameters(function) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_fake_nvml_functions_exist_in_pynvml_with_the_same_signatures():
    import pynvml

    functions = {n: f for n, f in fake_surface(FakeNvml()).items() if n.startswith("nvml")}

    assert len(functions) >= 9
    for name, fake in functions.items():
        real = getattr(pynvml, name, None)
        assert callable(real), f"pynvml has no {name}: the fake must not invent functions"
        assert parameters(fake) == parameters(real), name


def test_fake_nvml_constants_have_pynvml_values():
    import pynvml

    constants = {n: v for n, v in fake_surface(FakeNvml()).items() if n.startswith("NVML_")}

    assert "NVML_ERROR_DRIVER_NOT_LOADED" in constants
    for name, value in constants.items():
        assert getattr(pynvml, name) == value, name


def test_fake_nvml_errors_behave_like_pynvml_errors():
    import pynvml

    nvml = FakeNvml()
    classes = {n: c for n, c in fake_surface(nvml).items() if n.startswith("NVMLError_")}

    assert issubclass(pynvml.NVMLError, Exception) and issubclass(nvml.NVMLError, Exception)
    for name, fake_class in classes.items():
        real_class = getattr(pynvml, name)
        assert issubclass(real_class, pynvml.NVMLError) and issubclass(fake_class, nvml.NVMLError)
        real, fake = real_class(), fake_class()  # both built without arguments
        assert fake.value == real.value, name
        assert str(fake) == str(real), name
        # NVMLError(code) gives the code's subclass, in both.
        assert type(pynvml.NVMLError(real.value)).__name__ == name
        assert type(nvml.NVMLError(fake.value)) is fake_class


def test_fake_nvml_memory_and_process_objects_have_pynvml_fields():
    import dataclasses

    import pynvml

    memory_fields = [f.name for f in dataclasses.fields(FakeMemory)]
    process_fields = [f.name for f in dataclasses.fields(FakeProcess)]

    assert memory_fields == [name for name, _ in pynvml.c_nvmlMemory_t._fields_]
    assert process_fields == [name for name, _ in pynvml.c_nvmlProcessInfo_t._fields_]


def test_fake_and_real_nvml_refuse_calls_before_init():
    import pynvml

    if real_nvml_initialises():
        pytest.skip("NVML works on this machine; the check needs a library that is not loaded")
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()
    with pytest.raises(FakeNvml.NVMLError_Uninitialized):
        two_gpus().nvmlDeviceGetCount()


def test_real_nvml_init_raises_nvml_error_on_a_machine_without_gpu():
    """So "no GPU here" reaches gardenctl as the same exception type the fake raises."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        assert exc.value in (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
                             pynvml.NVML_ERROR_DRIVER_NOT_LOADED, pynvml.NVML_ERROR_NO_PERMISSION,
                             pynvml.NVML_ERROR_UNKNOWN)
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVIDIA driver")


# -- discover_local_gpus ------------------------------------------------------------------------


def test_discover_reads_each_gpu_with_its_processes():
    nvml = two_gpus()

    found = discover_local_gpus(nvml=nvml, node_name="box")

    assert (found.source, found.used_includes_ours) == ("nvml", True)
    assert [node.name for node in found.nodes] == ["box"]
    l4, a10g = found.gpus
    assert (l4.index, l4.name, l4.uuid) == (0, "NVIDIA L4", L4_UUID)  # bytes decoded
    assert (l4.total_bytes, l4.used_bytes) == (24 * GiB, 3 * GiB)
    # one entry per pid (compute and graphics merged), sorted, unknown memory kept as None
    assert l4.processes == (GpuProcess(pid=77, used_bytes=None),
                            GpuProcess(pid=4242, used_bytes=2 * GiB))
    assert (a10g.index, a10g.name, a10g.uuid, a10g.processes) == (1, "NVIDIA A10G", "GPU-a10g", ())
    assert nvml.init_count == 0  # shut down again


def test_discover_names_the_node_after_this_machine_by_default():
    found = discover_local_gpus(nvml=two_gpus())

    assert found.nodes[0].name == socket.gethostname()


def test_discover_still_reads_a_gpu_whose_process_list_is_not_supported():
    nvml = FakeNvml([FakeGpu("NVIDIA T4", total=16 * GiB, used=GiB,
                             processes_error=NVML_ERROR_NOT_SUPPORTED)])

    (gpu,) = discover_local_gpus(nvml=nvml, node_name="box").gpus

    assert (gpu.name, gpu.total_bytes, gpu.used_bytes, gpu.processes) == (
        "NVIDIA T4", 16 * GiB, GiB, ())


def test_discover_without_any_gpu_says_to_declare_the_inventory():
    nvml = FakeNvml([])

    with pytest.raises(InventoryError) as caught:
        discover_local_gpus(nvml=nvml)

    message = str(caught.value)
    assert "NVML found no GPU on this machine" in message
    assert "`inventory:`" in message and "--inventory FILE" in message
    assert nvml.init_count == 0


def test_discover_when_the_driver_is_not_loaded_says_why_and_what_to_do():
    nvml = FakeNvml(init_error=NVML_ERROR_DRIVER_NOT_LOADED)

    with pytest.raises(InventoryError) as caught:
        discover_local_gpus(nvml=nvml)

    message = str(caught.value)
    assert message.startswith("no NVIDIA GPU could be read on this machine "
                              "(NVML: Driver Not Loaded)")
    assert "`inventory:`" in message and "--inventory FILE" in message


def test_discover_when_a_gpu_is_lost_mid_read_fails_clearly_and_shuts_nvml_down():
    nvml = two_gpus()
    nvml.gpus[1].memory_error = NVML_ERROR_GPU_IS_LOST

    with pytest.raises(InventoryError) as caught:
        discover_local_gpus(nvml=nvml)

    assert str(caught.value) == "reading GPUs through NVML failed: GPU is lost"
    assert nvml.init_count == 0


# -- NvmlProbe (live free memory and pids, for the executor) ------------------------------------


def test_probe_reads_free_memory_and_pids_of_a_gpu():
    nvml = two_gpus()
    probe = NvmlProbe("box", nvml=nvml)

    assert probe.free_bytes("box", 0) == 21 * GiB
    assert probe.free_bytes("box", 1) == 22 * GiB
    assert probe.pids_on("box", 0) == {77, 4242}
    assert probe.pids_on("box", 1) == set()
    probe.close()
    assert nvml.init_count == 0


def test_probe_sees_memory_freed_since_the_last_read():
    nvml = two_gpus()
    probe = NvmlProbe("box", nvml=nvml)
    before = probe.free_bytes("box", 0)

    nvml.gpus[0].used = 0
    nvml.gpus[0].compute.clear()
    nvml.gpus[0].graphics.clear()

    assert (before, probe.free_bytes("box", 0)) == (21 * GiB, 24 * GiB)
    assert probe.pids_on("box", 0) == set()


def test_probe_refuses_a_gpu_of_another_node():
    probe = NvmlProbe("box", nvml=two_gpus())

    with pytest.raises(InventoryError) as caught:
        probe.free_bytes("other-box", 0)

    assert "NVML on box cannot read GPUs of node other-box" in str(caught.value)


def _probe_and_read_free(nvml: FakeNvml) -> None:
    NvmlProbe("box", nvml=nvml).free_bytes("box", 0)


def _probe_and_read_pids(nvml: FakeNvml) -> None:
    NvmlProbe("box", nvml=nvml).pids_on("box", 0)


@pytest.mark.parametrize("fail_at, read", [
    ("init", _probe_and_read_pids),
    ("memory", _probe_and_read_free),
    ("handle", _probe_and_read_pids),
], ids=["init", "free_bytes", "pids_on"])
def test_probe_reports_nvml_failures_as_inventory_errors(fail_at, read):
    nvml = two_gpus()
    if fail_at == "init":
        nvml.init_error = NVML_ERROR_DRIVER_NOT_LOADED
    elif fail_at == "memory":
        nvml.gpus[0].memory_error = NVML_ERROR_GPU_IS_LOST
    else:
        nvml.gpus.clear()  # the GPU fell off the bus: its index is no longer valid

    with pytest.raises(InventoryError):
        read(nvml)


# -- gardenctl inventory ------------------------------------------------------------------------

DECLARED = """\
name: lab
inventory:
  nodes:
    - name: workstation
      gpus: [{name: NVIDIA L40S, memory: 48GiB, count: 2, used: 2GiB}]
models: []
"""

INVENTORY_FILE = """\
nodes:
  - name: rack-1
    gpus: [{name: NVIDIA H100, memory: 80GiB}]
"""


@pytest.fixture
def nvml_module(monkeypatch):
    """Install a fake `pynvml` module where gardenctl imports it from; returns it."""

    def install(nvml: FakeNvml) -> FakeNvml:
        monkeypatch.setitem(sys.modules, "pynvml", nvml)
        return nvml

    return install


def write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(dedent(text))
    return name


def test_inventory_on_a_machine_without_gpu_or_garden_says_what_to_do(gardenctl_process):
    if real_nvml_initialises():
        pytest.skip("this machine has a working NVIDIA driver")

    result = gardenctl_process("inventory")

    assert (result.code, result.out) == (1, "")
    assert result.err.startswith("gardenctl: no NVIDIA GPU could be read on this machine (NVML: ")
    assert "`inventory:`" in result.err and "--inventory FILE" in result.err
    assert "Traceback" not in result.err and "internal error" not in result.err


def test_inventory_when_the_driver_is_not_loaded_exits_1_with_the_reason(gardenctl, nvml_module):
    nvml_module(FakeNvml(init_error=NVML_ERROR_DRIVER_NOT_LOADED))

    result = gardenctl("inventory")

    assert (result.code, result.out) == (1, "")
    assert result.err.startswith("gardenctl: no NVIDIA GPU could be read on this machine "
                                 "(NVML: Driver Not Loaded). Declare the hardware")


def test_inventory_lists_the_gpus_nvml_sees_with_their_processes(gardenctl, nvml_module):
    nvml = nvml_module(two_gpus())

    result = gardenctl("inventory")

    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        "GPUs (nvml):",
        f"  node {socket.gethostname()}",
        f"    GPU 0  NVIDIA L4  24.0 GiB total, 3.0 GiB used, 21.0 GiB free  {L4_UUID}",
        "      pid 77: ?",
        "      pid 4242: 2.0 GiB",
        "    GPU 1  NVIDIA A10G  22.0 GiB total, 0 B used, 22.0 GiB free  GPU-a10g",
    ]
    assert nvml.init_count == 0


def test_inventory_json_of_nvml_gpus_keeps_unknown_process_memory_as_null(gardenctl,
                                                                          nvml_module):
    nvml_module(two_gpus())

    document = json.loads(gardenctl("inventory", "-o", "json").out)

    assert document["format_version"] == 1 and document["source"] == "nvml"
    l4 = document["nodes"][0]["gpus"][0]
    assert l4 == {"index": 0, "uuid": L4_UUID, "name": "NVIDIA L4", "total_bytes": 24 * GiB,
                  "used_bytes": 3 * GiB, "free_bytes": 21 * GiB,
                  "processes": [{"pid": 77, "used_bytes": None},
                                {"pid": 4242, "used_bytes": 2 * GiB}]}


def test_inventory_lists_the_gpus_declared_in_the_garden(gardenctl, workdir):
    write(workdir, "garden.yaml", DECLARED)

    result = gardenctl("inventory")

    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        "GPUs (declared in garden.yaml):",
        "  node workstation",
        "    GPU 0  NVIDIA L40S  48.0 GiB total, 2.0 GiB used by others, 46.0 GiB free",
        "    GPU 1  NVIDIA L40S  48.0 GiB total, 2.0 GiB used by others, 46.0 GiB free",
    ]


def test_inventory_of_a_garden_file_elsewhere(gardenctl):
    result = gardenctl("inventory", "-f", str(REPO / "garden.yaml"), "-o", "json")
    document = json.loads(result.out)

    assert result.code == 0
    assert document["source"] == f"declared in {REPO / 'garden.yaml'}"
    assert [(g["index"], g["name"], g["total_bytes"]) for g in document["nodes"][0]["gpus"]] == [
        (0, "NVIDIA L40S", 48 * GiB), (1, "NVIDIA L40S", 48 * GiB)]


def test_inventory_file_wins_over_the_garden_and_nvml(gardenctl, workdir, nvml_module):
    nvml = nvml_module(two_gpus())
    write(workdir, "garden.yaml", DECLARED)
    write(workdir, "gpus.yaml", INVENTORY_FILE)

    text = gardenctl("inventory", "--inventory", "gpus.yaml")
    document = json.loads(gardenctl("inventory", "--inventory", "gpus.yaml", "-o", "json").out)

    assert text.code == 0
    assert text.out.splitlines() == [
        "GPUs (file gpus.yaml):",
        "  node rack-1",
        "    GPU 0  NVIDIA H100  80.0 GiB total, 0 B used by others, 80.0 GiB free",
    ]
    assert document == {
        "format_version": 1, "source": "file gpus.yaml",
        "nodes": [{"name": "rack-1", "gpus": [
            {"index": 0, "uuid": None, "name": "NVIDIA H100", "total_bytes": 80 * GiB,
             "used_bytes": 0, "free_bytes": 80 * GiB, "processes": []}]}],
    }
    assert nvml.init_count == 0


def test_inventory_uses_nvml_when_the_garden_declares_no_inventory(gardenctl, workdir,
                                                                   nvml_module):
    nvml_module(two_gpus())
    write(workdir, "garden.yaml", "name: lab\nmodels: []\n")

    result = gardenctl("inventory", "-o", "json")

    assert result.code == 0, result.err
    assert json.loads(result.out)["source"] == "nvml"


def test_inventory_with_a_broken_inventory_file_gives_located_errors(gardenctl, workdir):
    write(workdir, "gpus.yaml",
          "nodes:\n  - name: rack-1\n    gpus: [{name: H100, memory: eighty}]\n")

    result = gardenctl("inventory", "--inventory", "gpus.yaml")

    assert (result.code, result.out) == (1, "")
    assert "gpus.yaml:3:33: error: nodes[0].gpus[0].memory: expected a byte size" in result.err
    assert "Traceback" not in result.err


def test_inventory_file_errors_are_not_called_garden_file_errors(gardenctl, workdir):
    write(workdir, "gpus.yaml", "nodes: []\n")

    result = gardenctl("inventory", "--inventory", "gpus.yaml")

    assert result.code == 1
    assert "gpus.yaml:1:8: error: nodes:" in result.err
    assert "garden file" not in result.err
