#!/usr/bin/env python3
"""150 SSE clients that never read, 12 MB published to them; 15 s later: sessions, the
server-side connections still open, and the node's RSS. Usage: sse_idle.py HERALD_BIN PORT"""
import socket, subprocess, time, os, sys, json, urllib.request
bin=sys.argv[1]; port=int(sys.argv[2])
env=dict(os.environ, HERALD_LOG__LEVEL="error", HERALD_LIMITS__MAX_CONNECTIONS="1000")
p=subprocess.Popen([bin,"--listen",f"127.0.0.1:{port}"],env=env,stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
time.sleep(1.5)
def rss():
    for l in open(f"/proc/{p.pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])//1024
def metric(name):
    t=urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    for l in t.splitlines():
        if l.startswith(name+" "): return float(l.split()[1])
socks=[]
for i in range(150):
    s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1",port)); s.sendall(b"GET /sse?channel=feed HTTP/1.1\r\nhost: x\r\n\r\n"); socks.append(s)
time.sleep(1)
print("sessions", metric("herald_connections"), "rss MB", rss())
big=json.dumps({"channel":"feed","data":"x"*60000}).encode()
for i in range(200):
    req=urllib.request.Request(f"http://127.0.0.1:{port}/api/publish",data=big,headers={"content-type":"application/json"})
    urllib.request.urlopen(req).read()
time.sleep(15)
print("after 12 MB published to 150 idle SSE clients, 15 s later: sessions", metric("herald_connections"), "rss MB", rss())
open_conns=int(subprocess.run(["sh","-c",f"ss -tnH state established '( sport = :{port} )' | wc -l"],capture_output=True,text=True).stdout)
print("established server-side connections", open_conns)
p.kill()
