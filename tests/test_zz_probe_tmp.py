import os, signal, time, json, subprocess, fcntl, termios, struct
import test_codex as tc
from test_codex import codex_server, initialize, codex_bin, mock_model, codex_home, codex_env

def unread(f):
    return struct.unpack("i", fcntl.ioctl(f.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]

def test_race(codex_server, codex_bin, codex_env):
    server = codex_server(stdin=subprocess.PIPE)
    p = server.process
    def send(m):
        p.stdin.write(json.dumps(m).encode() + b"\n"); p.stdin.flush()
    send({"id": 1, "method": "initialize", "params": {"clientInfo": tc.CLIENT_INFO}})
    send({"id": 2, "method": "command/exec", "params": {"command": ["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' a"], "disableOutputCap": True}})
    tc.wait_until(lambda: unread(p.stdout) >= 60000, 10, "pipe full")
    pid = tc.logged_codex_pids(server)[0]
    os.kill(pid, signal.SIGKILL)
    tc.wait_until(lambda: not tc.alive(pid), 5, "dead")
    send({"id": 3, "method": "command/exec", "params": {"command": ["echo", "after"]}})
    server.wait_for_log("started codex app-server", count=2)
    stdio = tc.StdioClient(server)
    r2 = stdio.wait_for(lambda m: m.get("id") == 2 and "method" not in m)
    r3 = stdio.wait_for(lambda m: m.get("id") == 3 and "method" not in m)
    print("R2", str(r2)[:200]); print("R3", r3)
    time.sleep(1)
    print(server.log[-2500:])
