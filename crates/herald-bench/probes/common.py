"""What every probe here needs: a free loopback port, a process's CPU time, and a
`herald` node started with a configuration."""
import os
import socket
import subprocess
import tempfile
import time

TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_s(pid):
    """User + system CPU seconds of `pid` so far (/proc, in clock ticks)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def start_node(bin, config):
    """A `herald` node (binary `bin`) on a free loopback port with `config` (TOML
    text), logging errors only, given a second to start: (process, port)."""
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(config)
    cfg.close()
    port = free_port()
    proc = subprocess.Popen([bin, "--config", cfg.name, "--listen", f"127.0.0.1:{port}"],
                            env=dict(os.environ, HERALD_LOG__LEVEL="error"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return proc, port
