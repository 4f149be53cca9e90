// The demo page in a real headless Chromium (Debian's `chromium`, driven by
// playwright-core; no browser is downloaded), behind a real HAProxy balancing two real
// herald nodes that share a real redis-server.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { chromium } from 'playwright-core';
import {
  freePort,
  haproxy,
  herald as start,
  publish,
  redis as startRedis,
  sleep,
  tempFile,
  testCertificates,
  tool,
} from './harness.mjs';

const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';

// Presence with a short TTL: the members of the node the test kills leave within a second.
const herald = async (port, id, redis) =>
  (
    await start(port, ['--node-id', id, '--redis', redis, '--demo'], {
      HERALD_SHUTDOWN__DRAIN_WINDOW: '10ms',
      HERALD_PRESENCE__REFRESH_INTERVAL: '300ms',
      HERALD_PRESENCE__TTL: '1s',
    })
  ).proc;

async function until(what, pred, ms = 15000) {
  const end = Date.now() + ms;
  for (;;) {
    if (await pred()) return;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(25);
  }
}

// A new machine's first Chromium launch builds its caches (fonts, profile) and can take
// many seconds: launch with a generous timeout and load a blank page once, before any
// test clock starts.
async function launch(env = undefined) {
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    timeout: 120000,
    env,
    args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
  const warm = await browser.newPage();
  await warm.goto('about:blank', { timeout: 60000 });
  await warm.close();
  return browser;
}

// What a failure message carries: every page's console and errors, and the nodes' logs.
function explain(e, consoles, nodes) {
  const logs = Object.entries(nodes).map(([id, n]) => `--- node ${id} log:\n${(n.log ?? '').slice(-4000)}`);
  return new Error(`${e.message}\n--- page consoles:\n${consoles.join('\n')}\n${logs.join('\n')}`, { cause: e });
}

const items = (page, list) => page.$$eval(`#${list} li`, (lis) => lis.map((li) => li.textContent));

test('the demo in Chromium: chat between pages, no loss when a node dies, SSE where WebSocket is refused', async () => {
  tool(CHROMIUM, 'chromium');
  const redis = await startRedis();
  const ports = { a: await freePort(), b: await freePort() };
  const nodes = {};
  let lb;
  let browser;
  const consoles = [];
  try {
    nodes.a = await herald(ports.a, 'a', redis.url);
    nodes.b = await herald(ports.b, 'b', redis.url);
    // The second frontend refuses WebSocket upgrades: clients must fall back to SSE.
    lb = await haproxy(ports, ['', '    http-request deny deny_status 403 if { path /ws }\n']);
    const [front, noWs] = lb.ports;
    await until('HAProxy', async () => (await fetch(`http://127.0.0.1:${front}/readyz`).catch(() => null))?.ok);
    await sleep(300); // both servers checked up

    browser = await launch();
    let opened = 0;
    const open = async (port) => {
      const page = await browser.newPage();
      const label = `page ${++opened} (port ${port})`;
      const errors = [];
      page.on('pageerror', (e) => {
        errors.push(e);
        consoles.push(`${label} error: ${e.message}`);
      });
      page.on('console', (m) => consoles.push(`${label}: ${m.text()}`));
      await page.goto(`http://127.0.0.1:${port}/demo`, { timeout: 60000 });
      await until('connected', async () => (await page.textContent('#state')) === 'connected', 30000);
      return { page, errors };
    };
    const { page: a, errors: aErrors } = await open(front);
    const { page: b } = await open(front);

    // One page publishes, the other renders it.
    await b.fill('#text', 'hello from b');
    await b.click('#send');
    await until('the chat line on page a', async () => (await items(a, 'chat')).some((t) => t.endsWith('hello from b')));

    // Kill the node behind page a; publish while it reconnects; it must show all.
    await publish(ports.a, 'demo:feed', { text: 'before' });
    await until('the first feed item', async () => (await items(a, 'feed')).length === 1);
    const behind = await a.textContent('#node');
    const other = behind === 'a' ? 'b' : 'a';
    nodes[behind].kill('SIGKILL');
    const killed = Date.now();
    for (let i = 1; i <= 30; i++) await publish(ports[other], 'demo:feed', { text: `item ${i}` });
    await until('page a back on the other node', async () => (await a.textContent('#node')) === other);
    const back = Date.now() - killed;
    await until('every feed item on page a', async () => (await items(a, 'feed')).length === 31);
    const feed = await items(a, 'feed');
    assert.deepEqual(
      feed,
      ['#1before', ...Array.from({ length: 30 }, (_, i) => `#${i + 2}item ${i + 1}`)],
    );
    console.log(`page reconnected to node ${other} ${back} ms after node ${behind} was killed; 30 publications, none lost`);

    // Through a proxy that refuses WebSocket: the page falls back to SSE and still
    // chats both ways.
    const { page: c } = await open(noWs);
    assert.equal(await c.textContent('#transport'), 'sse');
    await c.fill('#text', 'hello over sse');
    await c.click('#send');
    await until('the SSE page\'s line on page a', async () => (await items(a, 'chat')).some((t) => t.endsWith('hello over sse')));
    await a.fill('#text', 'hello back');
    await a.click('#send');
    await until('page a\'s line on the SSE page', async () => (await items(c, 'chat')).some((t) => t.endsWith('hello back')));
    assert.deepEqual(aErrors, []);

    // A page opened now back-fills the feed's last 20 items (the history op) and shows
    // who is in the chat (presence: pages a, b, c and itself; c over SSE).
    const { page: d } = await open(front);
    await until('the back-filled feed', async () => (await items(d, 'feed')).length === 20);
    assert.deepEqual(await items(d, 'feed'), feed.slice(-20));
    await until('four pages online', async () => (await items(d, 'online')).length === 4);
    await until('page d on page a\'s list too', async () => (await items(a, 'online')).length === 4);
    await d.close();
    await until('page d left', async () => (await items(a, 'online')).length === 3);

    const shot = new URL('../../../target/demo.png', import.meta.url).pathname;
    mkdirSync(join(shot, '..'), { recursive: true });
    await a.screenshot({ path: shot });
    if (process.env.UPDATE_SCREENSHOT) await a.screenshot({ path: new URL('../../../docs/demo.png', import.meta.url).pathname });
  } catch (e) {
    throw explain(e, consoles, nodes);
  } finally {
    await browser?.close();
    lb?.proc.kill('SIGKILL');
    for (const n of Object.values(nodes)) n.kill('SIGKILL');
    redis.proc.kill('SIGKILL');
  }
});

test('a page on another origin falls back to SSE on the gateway (CORS), and publishes over it', async () => {
  tool(CHROMIUM, 'chromium');
  const gatewayPort = await freePort();
  const node = (await start(gatewayPort, ['--node-id', 'g', '--demo'])).proc;
  // The application's site: another origin (another port), serving a page that loads
  // the client from the gateway and is refused WebSocket (the client is told to give
  // up on it after one failure, as behind a proxy that refuses upgrades).
  const { createServer } = await import('node:http');
  const site = createServer((req, res) => {
    res.setHeader('content-type', 'text/html');
    res.end(`<!doctype html><title>waiting</title>
<script src="http://127.0.0.1:${gatewayPort}/herald.js"></script>
<script>
  const c = new Herald.Client('ws://127.0.0.1:${gatewayPort}/ws', {
    sseAfterFailures: 1, minReconnectDelay: 50, maxReconnectDelay: 200,
    WebSocket: class { constructor() { throw new Error('no WebSocket here'); } },
  });
  const sub = c.subscribe('demo:chat');
  sub.on('subscribed', () => {
    document.body.dataset.transport = c.transport;
    document.body.dataset.subscribed = 'yes';
  });
  sub.on('message', (d) => {
    document.title = 'got ' + JSON.stringify(d);
    if (d.text === 'hello') c.publish('demo:chat', { text: 'from the other origin' });
  });
</script>`);
  });
  await new Promise((r) => site.listen(0, '127.0.0.1', r));
  let browser;
  try {
    browser = await launch();
    const page = await browser.newPage();
    const consoles = [];
    page.on('console', (m) => consoles.push(m.text()));
    page.on('pageerror', (e) => consoles.push(`error: ${e.message}`));
    await page.goto(`http://127.0.0.1:${site.address().port}/`, { timeout: 60000 });
    try {
      await until('subscribed over SSE', async () => (await page.getAttribute('body', 'data-subscribed')) === 'yes', 30000);
    } catch (e) {
      throw explain(e, consoles, { g: node });
    }
    assert.equal(await page.getAttribute('body', 'data-transport'), 'sse');
    // Its reply goes back through /sse/publish (a cross-origin POST with a preflight);
    // it arrives as a second message on the same stream.
    await publish(gatewayPort, 'demo:chat', { text: 'hello' });
    await until('the message, then the page\'s own reply', async () =>
      (await page.title()) === `got ${JSON.stringify({ text: 'from the other origin' })}`,
    );
  } finally {
    await browser?.close();
    site.close();
    node.kill('SIGKILL');
  }
});

// Chromium on Linux trusts what the NSS database in $HOME/.pki/nssdb trusts: a HOME of
// our own, with the test CA added by certutil, is a user who installed that CA.
function homeTrusting(ca) {
  const certutil = tool('certutil', 'libnss3-tools');
  const home = mkdtempSync(join(tmpdir(), 'herald-chromium-home-'));
  const db = join(home, '.pki', 'nssdb');
  mkdirSync(db, { recursive: true });
  const run = (...args) => {
    const r = spawnSync(certutil, args, { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`certutil ${args.join(' ')}: ${r.stderr}`);
  };
  if (ca) {
    run('-d', `sql:${db}`, '-N', '--empty-password');
    run('-d', `sql:${db}`, '-A', '-t', 'C,,', '-n', 'herald-test-ca', '-i', ca);
  }
  return home;
}

test('the demo over TLS on the node ([tls]): Chromium trusting the test CA chats over wss://; one that does not is refused', async () => {
  tool(CHROMIUM, 'chromium');
  const certs = testCertificates();
  const port = await freePort();
  const node = (
    await start(port, ['--node-id', 't', '--demo'], {
      HERALD_TLS__CERT_FILE: certs.cert,
      HERALD_TLS__KEY_FILE: certs.key,
      HERALD_SHUTDOWN__DRAIN_WINDOW: '10ms',
    })
  ).proc;
  let trusting;
  let stranger;
  const consoles = [];
  try {
    trusting = await launch({ ...process.env, HOME: homeTrusting(certs.ca) });
    const open = async () => {
      const page = await trusting.newPage();
      page.on('console', (m) => consoles.push(m.text()));
      page.on('pageerror', (e) => consoles.push(`error: ${e.message}`));
      await page.goto(`https://127.0.0.1:${port}/demo`, { timeout: 60000 });
      await until('connected', async () => (await page.textContent('#state')) === 'connected', 30000);
      return page;
    };
    const a = await open();
    const b = await open();
    assert.equal(await a.textContent('#transport'), 'websocket');
    assert.equal(await a.evaluate(() => location.protocol), 'https:');
    await b.fill('#text', 'hello over wss');
    await b.click('#send');
    await until('the chat line on page a', async () => (await items(a, 'chat')).some((t) => t.endsWith('hello over wss')));

    // The same browser without the CA: the certificate is refused, as it must be.
    stranger = await launch({ ...process.env, HOME: homeTrusting(null) });
    const page = await stranger.newPage();
    const refused = await page.goto(`https://127.0.0.1:${port}/demo`, { timeout: 60000 }).then(
      () => 'loaded',
      (e) => e.message,
    );
    assert.match(refused, /ERR_CERT_AUTHORITY_INVALID/);
  } catch (e) {
    throw explain(e, consoles, { t: node });
  } finally {
    await trusting?.close();
    await stranger?.close();
    node.kill('SIGKILL');
  }
});

test('cookie sessions: the page\'s cookie reaches the connect hook, and the user reads only their channels', async () => {
  tool(CHROMIUM, 'chromium');
  const { createServer } = await import('node:http');
  const { randomBytes } = await import('node:crypto');
  const gatewayPort = await freePort();
  // The application: a login that sets an HttpOnly session cookie, a page, and the
  // connect hook that turns the cookie into a user.
  const sessions = new Map();
  const hookCalls = [];
  const app = createServer((req, res) => {
    const url = new URL(req.url, 'http://app');
    if (url.pathname === '/login') {
      const sid = randomBytes(16).toString('hex');
      sessions.set(sid, url.searchParams.get('user'));
      res.writeHead(302, { 'set-cookie': `sid=${sid}; HttpOnly; SameSite=Lax; Path=/`, location: `/${url.search.includes('sse') ? '?sse=1' : ''}` });
      return res.end();
    }
    if (url.pathname === '/herald/connect') {
      let body = '';
      req.on('data', (d) => (body += d));
      req.on('end', () => {
        const call = JSON.parse(body);
        hookCalls.push(call);
        const sid = (call.headers.cookie ?? '').split('; ').find((c) => c.startsWith('sid='))?.slice(4);
        const user = sessions.get(sid);
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify(user
          ? { result: { user, data: { name: user.toUpperCase() } } }
          : { error: { code: 401, message: 'sign in first' } }));
      });
      return;
    }
    const me = sessions.get((req.headers.cookie ?? '').split('; ').find((c) => c.startsWith('sid='))?.slice(4)) ?? '';
    const sse = url.searchParams.get('sse') === '1';
    res.setHeader('content-type', 'text/html');
    res.end(`<!doctype html><title>waiting</title>
<script src="http://127.0.0.1:${gatewayPort}/herald.js"></script>
<script>
  const c = new Herald.Client('ws://127.0.0.1:${gatewayPort}/ws', {
    minReconnectDelay: 50, maxReconnectDelay: 200, withCredentials: true,
    ${sse ? "sseAfterFailures: 1, WebSocket: class { constructor() { throw new Error('no WebSocket here'); } }," : ''}
  });
  c.on('welcome', (f) => { document.body.dataset.user = f.user ?? ''; document.body.dataset.name = f.data?.name ?? ''; });
  c.on('error', (e) => { document.body.dataset.error = e.code; });
  const me = ${JSON.stringify(me)};
  if (!me) c.subscribe('inbox:guest');
  if (me) {
    const own = c.subscribe('inbox:' + me);
    own.on('subscribed', () => { document.body.dataset.own = c.transport; });
    own.on('message', (d) => { document.title = 'got ' + JSON.stringify(d); });
    if (!${sse}) {
      const other = c.subscribe('inbox:someone-else');
      other.on('error', (e) => { document.body.dataset.other = e.code; });
      other.on('message', (d) => { document.title = 'LEAK ' + JSON.stringify(d); });
    }
  }
</script>`);
  });
  await new Promise((r) => app.listen(0, '127.0.0.1', r));
  const appPort = app.address().port;
  const config = tempFile('cookie-herald.toml', `
[auth]
anonymous = false
allowed_origins = ["http://127.0.0.1:${appPort}"]
[hooks.connect]
url = "http://127.0.0.1:${appPort}/herald/connect"
timeout = "2s"
forward_headers = ["cookie"]
[[channels.rules]]
pattern = "inbox:{sub}"
subscribe = "authenticated"
`);
  const node = (await start(gatewayPort, ['--config', config, '--node-id', 'g', '--demo'])).proc;
  let browser;
  const consoles = [];
  const watch = (page) => {
    page.on('console', (m) => consoles.push(m.text()));
    page.on('pageerror', (e) => consoles.push(`error: ${e.message}`));
  };
  try {
    browser = await launch();
    // Signed in: the cookie (HttpOnly: the page's script never sees it) reaches the
    // hook, the user is alice, her inbox is hers and someone else's is refused.
    const alice = await browser.newContext();
    const page = await alice.newPage();
    watch(page);
    await page.goto(`http://127.0.0.1:${appPort}/login?user=alice`, { timeout: 60000 });
    try {
      await until('alice connected, her inbox subscribed, the other refused', async () =>
        (await page.getAttribute('body', 'data-user')) === 'alice' &&
        (await page.getAttribute('body', 'data-own')) === 'websocket' &&
        (await page.getAttribute('body', 'data-other')) === 'forbidden', 30000);
    } catch (e) {
      throw explain(e, consoles, { g: node });
    }
    assert.equal(await page.getAttribute('body', 'data-name'), 'ALICE');
    assert.ok(hookCalls.some((c) => c.transport === 'websocket' && /sid=/.test(c.headers.cookie ?? '') && c.address === '127.0.0.1'));
    await publish(gatewayPort, 'inbox:someone-else', { secret: 1 });
    await publish(gatewayPort, 'inbox:alice', { hello: 'alice' });
    await until('her message', async () => (await page.title()) === `got ${JSON.stringify({ hello: 'alice' })}`);

    // The same session over SSE from the app's origin (cross-origin, with credentials).
    const ssePage = await alice.newPage();
    watch(ssePage);
    await ssePage.goto(`http://127.0.0.1:${appPort}/?sse=1`);
    try {
      await until('alice over SSE', async () =>
        (await ssePage.getAttribute('body', 'data-own')) === 'sse' &&
        (await ssePage.getAttribute('body', 'data-user')) === 'alice', 30000);
    } catch (e) {
      throw explain(e, consoles, { g: node });
    }
    await publish(gatewayPort, 'inbox:alice', { n: 2 });
    await until('her message over SSE', async () => (await ssePage.title()) === `got ${JSON.stringify({ n: 2 })}`);

    // Signed out: refused by the backend; the client stops with its code (no loop).
    const stranger = await browser.newContext();
    const out = await stranger.newPage();
    watch(out);
    await out.goto(`http://127.0.0.1:${appPort}/`);
    try {
      await until('the stranger refused', async () => (await out.getAttribute('body', 'data-error')) === 'refused', 30000);
    } catch (e) {
      throw explain(e, consoles, { g: node });
    }
    assert.equal(await out.getAttribute('body', 'data-user'), null);
    // Alice's first page has her second message too, and never someone else's.
    assert.equal(await page.title(), `got ${JSON.stringify({ n: 2 })}`);
  } finally {
    await browser?.close();
    app.close();
    node.kill('SIGKILL');
  }
});

test('permessage-deflate ([websocket] deflate): Chromium negotiates it, and large messages cross compressed both ways intact', async () => {
  tool(CHROMIUM, 'chromium');
  const port = await freePort();
  const node = (
    await start(port, ['--node-id', 'd', '--demo'], {
      HERALD_WEBSOCKET__DEFLATE: 'true',
      HERALD_SHUTDOWN__DRAIN_WINDOW: '10ms',
    })
  ).proc;
  let browser;
  const consoles = [];
  try {
    browser = await launch();
    const page = await browser.newPage();
    page.on('console', (m) => consoles.push(m.text()));
    page.on('pageerror', (e) => consoles.push(`error: ${e.message}`));
    // The demo's own client (small chat frames, under deflate_min_bytes, go as they are).
    await page.goto(`http://127.0.0.1:${port}/demo`, { timeout: 60000 });
    await until('connected', async () => (await page.textContent('#state')) === 'connected', 30000);
    await page.fill('#text', 'hello, compressed world');
    await page.click('#send');
    await until('the chat line', async () => (await items(page, 'chat')).some((t) => t.endsWith('hello, compressed world')));

    // A board of 300 rows: the browser compresses its publish (it does for every
    // message once negotiated), the node compresses the delivery.
    const board = { rows: Array.from({ length: 300 }, (_, i) => ({ i, name: `instrument-${i}`, bid: 100 + i, ask: 101 + i })) };
    const fromApi = { note: 'x'.repeat(5000), n: 7 };
    const seen = page.evaluate(
      async ({ port, board }) => {
        const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`);
        const got = [];
        let wake = () => {};
        ws.onmessage = (e) => {
          got.push(JSON.parse(e.data));
          wake();
        };
        await new Promise((ok, fail) => {
          ws.onopen = ok;
          ws.onerror = fail;
        });
        const next = async (pred) => {
          for (;;) {
            const hit = got.find(pred);
            if (hit) return hit;
            await new Promise((r) => (wake = r));
          }
        };
        ws.send(JSON.stringify({ op: 'subscribe', channel: 'demo:chat', id: 1 }));
        await next((f) => f.op === 'subscribed');
        ws.send(JSON.stringify({ op: 'publish', channel: 'demo:chat', data: board, id: 2 }));
        const echoed = await next((f) => f.op === 'message' && f.data?.rows);
        window.__ready = true;
        const api = await next((f) => f.op === 'message' && f.data?.note);
        return { extensions: ws.extensions, echoed: echoed.data, api: api.data };
      },
      { port, board },
    );
    await until('the page has its board back', () => page.evaluate(() => window.__ready === true));
    await publish(port, 'demo:chat', fromApi);
    const result = await seen;
    assert.match(result.extensions, /permessage-deflate/);
    assert.match(result.extensions, /server_no_context_takeover/);
    assert.deepEqual(result.echoed, board);
    assert.deepEqual(result.api, fromApi);
  } catch (e) {
    throw explain(e, consoles, { d: node });
  } finally {
    await browser?.close();
    node.kill('SIGKILL');
  }
});
