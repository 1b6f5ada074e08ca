"""Where a cold start goes: wait for the gateway's /ready while sampling the CPU time of every process
`make run` started (the gateway, each worker's vLLM API server and the engine core it spawns)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

import psutil

from bench.common import wait_http


@dataclass
class ProcessUse:
    """One process seen during start-up: when it appeared and the CPU seconds it used until ready."""

    role: str
    first_seen_s: float
    cpu_s: float = 0.0


@dataclass
class ColdStart:
    seconds: float
    processes: dict[int, ProcessUse] = field(default_factory=dict)


def role_of(process: psutil.Process) -> str:
    """gateway / vLLM API server / engine core, named by the model each worker serves."""
    command = process.cmdline()
    if "serve" in command and any("llm-gateway" in part or "service.cli" in part for part in command):
        return "gateway"
    if "vllm.entrypoints.openai.api_server" in command:
        return f"vLLM API server ({_served_name(command)})"
    parent = process.parent()
    if parent is not None and "vllm.entrypoints.openai.api_server" in parent.cmdline():
        return f"vLLM engine core ({_served_name(parent.cmdline())})"
    return " ".join(command)[:60]


def _served_name(command: list[str]) -> str:
    for flag in ("--served-model-name", "--model"):
        if flag in command and command.index(flag) + 1 < len(command):
            return command[command.index(flag) + 1]
    return "?"


def measure(make: subprocess.Popen[bytes], ready_url: str, timeout: float = 900) -> ColdStart:
    """Seconds from now until ready_url answers 200, and what each process under `make` used by then."""
    result = ColdStart(seconds=0.0)
    root = psutil.Process(make.pid)
    result.seconds = wait_http(ready_url, timeout, make, lambda elapsed: _sample(root, result, elapsed))
    _sample(root, result, result.seconds)
    return result


def _sample(root: psutil.Process, result: ColdStart, now: float) -> None:
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            role = role_of(process)  # again each time: a process just forked has not exec'd its command yet
            use = result.processes.setdefault(process.pid, ProcessUse(role, now))
            use.role, use.cpu_s = role, times.user + times.system
        except psutil.Error:  # exited between listing and reading
            continue


def rows(cold: ColdStart, min_cpu_s: float = 0.5) -> list[list[str]]:
    """One row per process that used at least min_cpu_s CPU seconds, in order of appearance."""
    busy = sorted((u for u in cold.processes.values() if u.cpu_s >= min_cpu_s), key=lambda u: u.first_seen_s)
    return [[use.role, f"{use.first_seen_s:.1f}", f"{use.cpu_s:.1f}"] for use in busy]
