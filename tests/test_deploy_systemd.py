"""deploy/systemd: the units pass `systemd-analyze verify` and keep their hardening score, and each unit, with its
example environment file, starts its server with flags that server accepts.

verify checks that ExecStart's executable exists, so the units are rendered into a temporary directory with this
checkout's executables in place of /opt/splitspec/.venv/bin.
"""

from __future__ import annotations

import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from draft_server.cli import build_parser as draft_parser
from target_server.cli import build_parser as target_parser

SYSTEMD_DIR = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "systemd"
INSTALL_BIN = "/opt/splitspec/.venv/bin/"
VENV_BIN = pathlib.Path(sys.executable).parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
DRAFT_INSTANCES = sorted(int(path.name[len("splitspec-draft@"):-len(".service.d")])
                         for path in SYSTEMD_DIR.glob("splitspec-draft@*.service.d"))
# systemd-analyze security's overall exposure, times 10 (1.8 reads 18): 0 is locked down, 100 is fully exposed.
MAX_EXPOSURE = 20

needs_systemd = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


def render(directory: pathlib.Path, edit=lambda text: text) -> list[pathlib.Path]:
    """The units, copied into `directory` with this venv's executables and passed through `edit`; the template also
    as splitspec-draft@N.service beside its drop-in directory, which is how systemd loads instance N."""
    units = []
    for source in sorted(SYSTEMD_DIR.glob("*.service")):
        unit = directory / source.name
        unit.write_text(edit(source.read_text().replace(INSTALL_BIN, f"{VENV_BIN}/")))
        units.append(unit)
    for instance in DRAFT_INSTANCES:
        drop_ins = f"splitspec-draft@{instance}.service.d"
        shutil.copytree(SYSTEMD_DIR / drop_ins, directory / drop_ins)
        units.append(directory / f"splitspec-draft@{instance}.service")
        shutil.copy(directory / "splitspec-draft@.service", units[-1])
    return units


def verify(units: list[pathlib.Path]) -> str:
    """What systemd-analyze verify says about the units: nothing when they are clean. It exits 0 after an unknown
    key or a value it cannot parse (it logs the line and ignores it), so any output at all is a finding."""
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", *map(str, units)],
                            capture_output=True, text=True, timeout=120)
    findings = (result.stdout + result.stderr).strip()
    return findings if result.returncode == 0 else f"{findings}\n(exit status {result.returncode})"


@needs_systemd
def test_units_verify_clean(tmp_path):
    assert all((VENV_BIN / name).is_file() for name in ("splitspec-draft", "splitspec-target"))
    units = render(tmp_path)
    assert {unit.name for unit in units} >= {"splitspec-draft@.service", "splitspec-draft@0.service",
                                             "splitspec-target.service"}
    assert verify(units) == ""


@needs_systemd
@pytest.mark.parametrize("broken", [
    pytest.param(lambda text: text.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"), id="misspelt-key"),
    pytest.param(lambda text: text.replace("Restart=on-failure", "Restart=on-failures"), id="bad-value"),
    pytest.param(lambda text: text.replace(f"{VENV_BIN}/", "/nonexistent/bin/"), id="missing-executable"),
])
def test_verify_catches_a_broken_unit(tmp_path, broken):
    """Negative control: the check above would fail on each of these."""
    assert verify(render(tmp_path, broken)) != ""


@needs_systemd
def test_hardening_keeps_exposure_low(tmp_path):
    units = [unit for unit in render(tmp_path) if unit.name != "splitspec-draft@.service"]
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", f"--threshold={MAX_EXPOSURE}",
                             "--no-pager", *map(str, units)], capture_output=True, text=True, timeout=120)
    exposures = re.findall(r"Overall exposure level for (\S+): ([\d.]+)", result.stdout)
    assert result.returncode == 0, exposures or result.stderr
    assert len(exposures) == len(units)


def read_env_file(path: pathlib.Path) -> dict[str, str]:
    """KEY=VALUE lines; comments and blank lines skipped (the examples use no quotes)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and line[0] != "#")
    return {key.strip(): value.strip() for key, value in pairs}


def command_line(unit: pathlib.Path, env: dict[str, str], instance: str = "") -> list[str]:
    """ExecStart as systemd runs it: %i is the instance, ${VAR} one argument, $VAR split at whitespace."""
    joined = re.sub(r"\\\n\s*", " ", unit.read_text())  # a trailing backslash continues the line
    (command,) = re.findall(r"^ExecStart=(.*)$", joined, flags=re.M)
    argv = []
    for word in shlex.split(command.replace("%i", instance)):
        variable = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", word)
        if variable is None:
            argv.append(word)
            continue
        name = variable[1] or variable[2]
        assert name in env, f"{unit.name} uses ${name}, which the example environment file does not set"
        argv.extend([env[name]] if variable[1] else env[name].split())
    return argv


@pytest.mark.parametrize("instance", DRAFT_INSTANCES)
def test_draft_instance_runs_on_its_numa_node(instance):
    env = read_env_file(SYSTEMD_DIR / "env" / f"draft-{instance}.env")
    argv = command_line(SYSTEMD_DIR / "splitspec-draft@.service", env, str(instance))
    assert argv[0] == f"{INSTALL_BIN}splitspec-draft"
    args = draft_parser().parse_args(argv[1:])
    assert (args.model, args.port) == (env["SPLITSPEC_MODEL"], int(env["SPLITSPEC_PORT"]))
    assert args.numa_node == instance
    assert args.threads == int(env["OMP_NUM_THREADS"])
    # systemd's own binding, set before the server starts, is to the same node.
    numa_mask = re.findall(r"^NUMAMask=(.*)$", (SYSTEMD_DIR / f"splitspec-draft@{instance}.service.d" / "numa.conf")
                           .read_text(), flags=re.M)
    assert numa_mask == [str(instance)]


def test_target_uses_every_example_draft():
    env = read_env_file(SYSTEMD_DIR / "env" / "target.env")
    argv = command_line(SYSTEMD_DIR / "splitspec-target.service", env)
    assert argv[0] == f"{INSTALL_BIN}splitspec-target"
    args = target_parser().parse_args(argv[1:])
    assert (args.model, args.port) == (env["SPLITSPEC_MODEL"], int(env["SPLITSPEC_PORT"]))
    draft_ports = [read_env_file(SYSTEMD_DIR / "env" / f"draft-{instance}.env")["SPLITSPEC_PORT"]
                   for instance in DRAFT_INSTANCES]
    assert len(set(draft_ports)) == len(DRAFT_INSTANCES) >= 2, "one port per draft instance on the same host"
    assert sorted(address.rsplit(":", 1)[1] for address in args.draft) == sorted(draft_ports)


def unit_and_args(name: str):
    """A unit's text and its server's parsed flags, with the unit's example environment file."""
    unit = SYSTEMD_DIR / name
    if name.startswith("splitspec-draft@"):
        instance = DRAFT_INSTANCES[0]
        env = read_env_file(SYSTEMD_DIR / "env" / f"draft-{instance}.env")
        return unit.read_text(), draft_parser().parse_args(command_line(unit, env, str(instance))[1:])
    env = read_env_file(SYSTEMD_DIR / "env" / "target.env")
    return unit.read_text(), target_parser().parse_args(command_line(unit, env)[1:])


@pytest.mark.parametrize("name", ["splitspec-draft@.service", "splitspec-target.service"])
def test_stop_timeout_outlasts_the_shutdown_grace(name):
    """systemd SIGKILLs a server still running at TimeoutStopSec: the server's --shutdown-grace, then its own
    stopping (cancelled calls, the model worker) must fit inside it."""
    text, args = unit_and_args(name)
    (timeout,) = re.findall(r"^TimeoutStopSec=(\d+)$", text, flags=re.M)
    assert int(timeout) >= args.shutdown_grace + 10


def test_target_unit_creates_the_nvidia_uvm_device_first():
    """The hardened server cannot run the setuid nvidia-modprobe that makes /dev/nvidia-uvm on a fresh boot: the unit
    does it before, privileged ('+'), and a host without it still starts ('-')."""
    text = (SYSTEMD_DIR / "splitspec-target.service").read_text()
    assert re.findall(r"^ExecStartPre=(.*)$", text, flags=re.M) == ["-+/usr/bin/nvidia-modprobe -u -c0"]
    (after,) = re.findall(r"^After=(.*)$", text, flags=re.M)
    assert "nvidia-persistenced.service" in after.split()
