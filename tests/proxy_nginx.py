"""Helpers for the proxy and soak tests (tests/play/test_proxy.py, tests/play/test_soak.py): play servers
as real `python -m wan.play` processes, the proxy guide's nginx configuration (docs/PLAY_SERVER_PROXY.md) made runnable (its
ports, a self-signed certificate) and nginx run unprivileged in the foreground with every path in
one temporary folder, and what /proc says about a process (RSS, threads, open fds).

Nothing here needs root: as root (CI) nginx is started as `nobody`, so it is as unprivileged as
on a developer's machine.
"""
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "docs" / "PLAY_SERVER_PROXY.md"  # the page that holds the nginx configuration
NGINX_BLOCK = re.compile(r"With nginx:\s*```nginx\n(.*?)```", re.S)


# the README's configuration ------------------------------------------------------------------
def nginx_binary() -> Optional[str]:
    """nginx's path (PATH, else Debian's /usr/sbin, often not on a user's PATH), or None."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def readme_nginx_block(readme: Path = README) -> str:
    """The proxy guide's nginx configuration (the ```nginx block after "With nginx:")."""
    match = NGINX_BLOCK.search(readme.read_text())
    if match is None:
        raise AssertionError(f"{readme}: no ```nginx block after 'With nginx:' (the proxy section)")
    return match.group(1)


def _sub(pattern: str, replacement, text: str, what: str) -> str:
    new, count = re.subn(pattern, replacement, text)
    if count == 0:
        raise AssertionError(f"the proxy guide's nginx block has no {what} (pattern {pattern!r}); the "
                             f"tests cannot make it runnable:\n{text}")
    return new


def runnable_config(block: str, backends: List[int], listen_port: int, cert: Path, key: Path,
                    folder: Path) -> str:
    """The README's block as a whole nginx.conf: its upstream servers replaced by
    127.0.0.1:`backends`, `listen 443` by 127.0.0.1:`listen_port`, its certificate paths by
    `cert` and `key`; everything else as written. The rest (pid, logs, temp paths, an access log
    that names each request's upstream) points into `folder`."""
    servers = " ".join(f"server 127.0.0.1:{port};" for port in backends)
    first = [True]

    def upstream_servers(match):  # all the README's servers -> ours, in place of the first one
        if first[0]:
            first[0] = False
            return servers
        return ""
    block = _sub(r"\bserver\s+[0-9.]+:\d+[^;{]*;", upstream_servers, block, "upstream servers")
    block = _sub(r"\blisten\s+443\b", f"listen 127.0.0.1:{listen_port}", block, "listen 443")
    block = _sub(r"\bssl_certificate\s+[^;]+;", f"ssl_certificate {cert};", block,
                 "ssl_certificate")
    block = _sub(r"\bssl_certificate_key\s+[^;]+;", f"ssl_certificate_key {key};", block,
                 "ssl_certificate_key")
    temp = "\n".join(f"    {name}_temp_path {folder}/temp/{name};"
                     for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""# made by tests/proxy_nginx.py from docs/PLAY_SERVER_PROXY.md
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
events {{ worker_connections 512; }}
http {{
    log_format upstreams '$msec "$upstream_addr" "$request" $status cookie=$cookie_wan_session';
    access_log {folder}/access.log upstreams;
{temp}
    # ---- docs/PLAY_SERVER_PROXY.md ----
{block}
    # ---- end of docs/PLAY_SERVER_PROXY.md ----
}}
"""


def self_signed_certificate(folder: Path):
    """(certificate, key) for CN=localhost, IP 127.0.0.1, made with openssl."""
    cert, key = folder / "play.pem", folder / "play.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def client_tls(cert: Path) -> ssl.SSLContext:
    """A client context that trusts only `cert` and checks the host name: real TLS."""
    context = ssl.create_default_context(cafile=str(cert))
    return context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float, what: str,
                  log: Optional[Path] = None):
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}) while starting"
                               + (f":\n{tail(log)}" if log else ""))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {port} in {timeout:.0f} s"
                               + (f":\n{tail(log)}" if log else ""))
        time.sleep(0.1)


def tail(path: Optional[Path], lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Nginx:
    """nginx in the foreground (`daemon off`, one worker) on the README's configuration made
    runnable, everything in a folder of its own (removed at the end); `with Nginx([8000, 8001])
    as proxy:` gives `proxy.port`, `proxy.cert`, `proxy.upstreams()`. As root it runs as
    `nobody` (the folder is handed over)."""

    def __init__(self, backends: List[int], port: int = 0):
        self.backends = list(backends)
        self.port = port or free_port()
        self.binary = nginx_binary()
        if self.binary is None:
            raise RuntimeError("nginx is not installed")
        self.user = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
        # its own folder in /tmp (pytest's tmp_path is 0700 root's: `nobody` could not enter it)
        self.folder = Path(tempfile.mkdtemp(prefix="wan-nginx-"))

    def write(self) -> Path:
        (self.folder / "temp").mkdir(parents=True, exist_ok=True)
        self.cert, self.key = self_signed_certificate(self.folder)
        self.conf = self.folder / "nginx.conf"
        self.conf.write_text(runnable_config(readme_nginx_block(), self.backends, self.port,
                                             self.cert, self.key, self.folder))
        self.access_log, self.error_log = self.folder / "access.log", self.folder / "error.log"
        if self.user is not None:
            for path in [self.folder, *self.folder.rglob("*")]:
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        return self.conf

    def command(self, *extra) -> List[str]:
        return [self.binary, "-p", str(self.folder), "-c", str(self.conf), "-e",
                str(self.folder / "error.log"), *extra]

    def _popen_user(self):
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def check(self) -> subprocess.CompletedProcess:
        """`nginx -t` on the configuration."""
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=60,
                              **self._popen_user())

    def __enter__(self):
        self.write()
        checked = self.check()
        if checked.returncode != 0:
            raise AssertionError(f"nginx -t refuses the README's configuration:\n"
                                 f"{checked.stderr}\n{self.conf.read_text()}")
        self.process = subprocess.Popen(self.command("-g", "daemon off;"),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        **self._popen_user())
        try:
            wait_for_port(self.port, self.process, 30, "nginx", self.error_log)
        except BaseException:
            self.__exit__()
            raise
        return self

    def upstreams(self) -> List[tuple]:
        """(upstream address, request line, cookie) of every request so far."""
        out = []
        for line in self.access_log.read_text().splitlines():
            match = re.match(r'\S+ "([^"]*)" "([^"]*)" \d+ cookie=(\S*)', line)
            if match:
                out.append(match.groups())
        return out

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful; SIGTERM if it lingers
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


# play servers as processes --------------------------------------------------------------------
class PlayProcess:
    """`python -m wan.play --preset tiny --device cpu` on a free loopback port, in its own process
    (what /proc reads is the server's alone). `args`: more of its command line."""

    def __init__(self, folder: Path, name: str, args=(), threads: Optional[int] = None,
                 start_timeout: float = 180.0, token: Optional[str] = None):
        self.folder, self.name, self.args = Path(folder), name, list(args)
        self.token = token
        if token:
            self.args += ["--token", token]
        self.threads, self.start_timeout = threads, start_timeout
        self.port = free_port()
        self.log = self.folder / f"{name}.log"
        self.process: Optional[subprocess.Popen] = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                         if env.get("PYTHONPATH") else "")
        env.pop("TRITON_INTERPRET", None)  # conftest sets it for the tests; the server needs none
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        command = [sys.executable, "-m", "wan.play", "--preset", "tiny", "--device", "cpu",
                   "--port", str(self.port), "--log-level", "INFO", *self.args]
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}) while "
                                   f"starting:\n{tail(self.log)}")
            try:
                if self.health()["status"] == "ok":
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not answer /health in "
                                   f"{self.start_timeout:.0f} s:\n{tail(self.log)}")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _query(self) -> str:
        return f"?token={self.token}" if self.token else ""

    def health(self) -> dict:
        with urllib.request.urlopen(self.http + "/health" + self._query(), timeout=10) as response:
            return json.loads(response.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(self.http + "/metrics" + self._query(),
                                    timeout=10) as response:
            return response.read().decode()

    def kill(self):
        """SIGKILL: the process dies as in a crash (no close frames, no shutdown)."""
        if self.alive():
            self.process.kill()
        if self.process is not None:
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> Optional[float]:
        """SIGTERM (uvicorn's graceful stop), SIGKILL after `timeout`: seconds it took to exit,
        None when it had to be killed."""
        if not self.alive():
            return 0.0
        start = time.monotonic()
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
            return time.monotonic() - start
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop(timeout=15)


# what /proc says -----------------------------------------------------------------------------
def proc_stats(pid: int) -> dict:
    """RSS (bytes), threads, open fds and open sockets of process `pid` (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))
    fds = sockets = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                sockets += 1
        except OSError:
            pass
    return {"rss": rss, "threads": threads, "fds": fds, "sockets": sockets}


def metric_values(text: str, name: str) -> List[tuple]:
    """(labels, value) of each sample of metric `name` in Prometheus text."""
    out = []
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
            if match:
                out.append((match.group(1) or "", float(match.group(2))))
    return out
