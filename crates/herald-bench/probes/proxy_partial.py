#!/usr/bin/env python3
"""1,000 connections each holding a partial PROXY v1 header: the node's CPU over 5 s.
Usage: proxy_partial.py HERALD_BIN"""
import socket, subprocess, time, os, sys
bin=sys.argv[1]
port=18931
env=dict(os.environ, HERALD_PROXY__PROTOCOL="true", HERALD_LOG__LEVEL="error", HERALD_LIMITS__HANDSHAKE_TIMEOUT="60s")
p=subprocess.Popen([bin,"--listen",f"127.0.0.1:{port}"],env=env,stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
time.sleep(1.5)
socks=[]
for i in range(1000):
    s=socket.create_connection(("127.0.0.1",port)); s.sendall(b"PROXY TCP4 203.0"); socks.append(s)
time.sleep(1)
def cpu():
    f=open(f"/proc/{p.pid}/stat").read().split(")")[1].split()
    return (int(f[11])+int(f[12]))/os.sysconf("SC_CLK_TCK")
a=cpu(); time.sleep(5); b=cpu()
print(f"{bin}: herald CPU with 1000 partial PROXY headers: {(b-a)/5*100:.1f}% of a core")
p.kill()
