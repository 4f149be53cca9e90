// Real processes for the JS client's tests and benchmark: herald nodes, redis-server,
// HAProxy. A missing program fails with its install command, never a skip.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** The herald binary: TEST_HERALD_BIN, or the workspace's debug build. */
export const BIN = process.env.TEST_HERALD_BIN ?? new URL('../../../target/debug/herald', import.meta.url).pathname;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** `path` if it exists (or is on PATH), else an error naming the Debian package. */
export function tool(path, pkg) {
  const found = path.startsWith('/') ? existsSync(path) : spawnSync('which', [path]).status === 0;
  if (!found) throw new Error(`${path} is missing: install it with \`apt-get install ${pkg}\``);
  return path;
}

export function freePort() {
  return new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** A file in a fresh temporary directory. */
export function tempFile(name, text) {
  const path = join(mkdtempSync(join(tmpdir(), 'herald-js-')), name);
  writeFileSync(path, text);
  return path;
}

// herald reads every HERALD_* variable as configuration: start it without the caller's.
const cleanEnv = () => Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('HERALD_')));

/** Starts herald on 127.0.0.1:`port` (0: any) with `args` and `env`; resolves with
 * { proc, addr } once it listens. */
export function herald(port, args = [], env = {}) {
  const proc = spawn(BIN, ['--listen', `127.0.0.1:${port}`, ...args], {
    env: { ...cleanEnv(), RUST_LOG: 'info', ...env },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  // Its log stays readable (the last 64 KiB) for a failing test's message.
  proc.log = '';
  proc.stderr.on('data', (d) => {
    proc.log = (proc.log + d).slice(-65536);
  });
  return new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`herald did not start: ${buf}`));
    }, 20000);
    proc.stderr.on('data', (d) => {
      buf += d;
      const m = buf.match(/wss?:\/\/([0-9.:]+)\/ws/);
      if (m) {
        clearTimeout(timer);
        resolve({ proc, addr: m[1] });
      }
    });
    proc.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`herald exited ${code}: ${buf}`));
    });
  });
}

/** Stops a node started by `herald` and waits for it to exit. */
export function stop(h, signal = 'SIGTERM') {
  return new Promise((resolve) => {
    if (h.proc.exitCode !== null || h.proc.signalCode !== null) return resolve();
    h.proc.once('exit', () => resolve());
    h.proc.kill(signal);
  });
}

/** A redis-server without persistence; resolves with { proc, url }. */
export async function redis(port) {
  // A free port can be taken between picking and binding (other processes open
  // ephemeral ports too): redis-server then exits at once, and is started again on
  // another port, unless the caller named the port. After three tries the error
  // carries what it said.
  let said = '';
  for (let attempt = 0; attempt < 3; attempt++) {
    const p = port ?? (await freePort());
    const proc = spawn(tool('redis-server', 'redis-server'), ['--port', String(p), '--save', '', '--appendonly', 'no'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    proc.stdout.on('data', (d) => (out = (out + d).slice(-4096)));
    proc.stderr.on('data', (d) => (out = (out + d).slice(-4096)));
    const end = Date.now() + 10000;
    let up = false;
    while (!up) {
      up = await listening(p);
      if (up || proc.exitCode !== null || Date.now() > end) break;
      await sleep(25);
    }
    // Listening, but is it ours? Another process may hold the port while ours exits.
    if (up) await sleep(50);
    if (up && proc.exitCode === null) {
      proc.stdout.resume();
      proc.stderr.resume();
      return { proc, url: `redis://127.0.0.1:${p}` };
    }
    proc.kill('SIGKILL');
    said = `redis-server did not start on ${p}: ${out}`;
    if (port !== undefined) break;
  }
  throw new Error(said);
}

/** HAProxy balancing `servers` (name → port) with 100 ms health checks on /readyz; one
 * frontend per entry of `extras` (lines added to that frontend), all on that backend.
 * Picks free ports for the frontends and resolves with { proc, ports } once HAProxy
 * listens on all of them. A port taken between picking and binding (other processes
 * open ephemeral ports too) makes HAProxy exit: it is started again on new ports, and
 * after three tries the error carries what HAProxy said. */
export async function haproxy(servers, extras) {
  let said = '';
  for (let attempt = 0; attempt < 3; attempt++) {
    const ports = [];
    for (const _ of extras) ports.push(await freePort());
    const proc = spawn(tool('haproxy', 'haproxy'), ['-db', '-f', haproxyConfig(servers, ports, extras)], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    said = '';
    proc.stderr.on('data', (d) => (said += d));
    const end = Date.now() + 10000;
    while (proc.exitCode === null && Date.now() < end) {
      if ((await Promise.all(ports.map(listening))).every(Boolean)) return { proc, ports };
      await sleep(25);
    }
    proc.kill('SIGKILL');
  }
  throw new Error(`HAProxy did not start: ${said}`);
}

function listening(port) {
  return new Promise((resolve) => {
    const c = connect(port, '127.0.0.1', () => {
      c.destroy();
      resolve(true);
    });
    c.on('error', () => resolve(false));
  });
}

function haproxyConfig(servers, ports, extras) {
  const fronts = ports
    .map((port, i) => `frontend f${i}\n    bind 127.0.0.1:${port}\n${extras[i]}    default_backend herald\n`)
    .join('');
  const backs = Object.entries(servers)
    .map(([name, port]) => `    server ${name} 127.0.0.1:${port} check\n`)
    .join('');
  return tempFile(
    'haproxy.cfg',
    `global
    maxconn 1000
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    retries 2
    option redispatch
${fronts}backend herald
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 100ms fall 1 rise 1
${backs}`,
  );
}

/** POST /api/publish on 127.0.0.1:`port` (or `addr` "host:port"); throws unless 200. */
export async function publish(where, channel, data) {
  const addr = typeof where === 'number' ? `127.0.0.1:${where}` : where;
  const r = await fetch(`http://${addr}/api/publish`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ channel, data }),
  });
  if (r.status !== 200) throw new Error(`publish: ${r.status} ${await r.text()}`);
}

/** A TCP relay to `target` ("host:port") that a test can stall and cut: `hold()` keeps
 * the server's bytes from reaching the client (the requests still go through, so the
 * server acts on them and its answers are lost with the connection), `cut()` destroys
 * every relayed connection and forwards normally again. */
export async function relay(target) {
  const [host, port] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))];
  const pairs = new Set();
  let holding = false;
  const server = createServer((down) => {
    const up = connect(port, host);
    const pair = { down, up };
    pairs.add(pair);
    down.on('data', (b) => up.write(b));
    up.on('data', (b) => {
      if (!holding) down.write(b);
    });
    const end = () => {
      pairs.delete(pair);
      down.destroy();
      up.destroy();
    };
    down.on('error', end).on('close', end);
    up.on('error', end).on('close', end);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    addr: `127.0.0.1:${server.address().port}`,
    hold: () => (holding = true),
    cut: () => {
      for (const { down, up } of [...pairs]) {
        down.destroy();
        up.destroy();
      }
      holding = false;
    },
    close: () => server.close(),
  };
}

/** A test CA and a server certificate it signed for 127.0.0.1 and localhost, made with
 * openssl in a fresh directory: { dir, ca, cert, key } (PEM paths). */
export function testCertificates() {
  const openssl = tool('openssl', 'openssl');
  const dir = mkdtempSync(join(tmpdir(), 'herald-tls-'));
  const run = (...args) => {
    const r = spawnSync(openssl, args, { cwd: dir, encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`openssl ${args.join(' ')}: ${r.stderr}`);
  };
  run('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', '/CN=Herald test CA', '-keyout', 'ca.key', '-out', 'ca.pem');
  run('req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=localhost', '-keyout', 'server.key', '-out', 'server.csr');
  writeFileSync(join(dir, 'server.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n');
  run('x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-days', '2', '-extfile', 'server.ext', '-out', 'server.pem');
  return { dir, ca: join(dir, 'ca.pem'), cert: join(dir, 'server.pem'), key: join(dir, 'server.key') };
}
