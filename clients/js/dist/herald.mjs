var __defProp = Object.defineProperty;
var __defNormalProp = (obj, key, value) => key in obj ? __defProp(obj, key, { enumerable: true, configurable: true, writable: true, value }) : obj[key] = value;
var __publicField = (obj, key, value) => __defNormalProp(obj, typeof key !== "symbol" ? key + "" : key, value);

// node_modules/fossil-delta/fossil-delta.js
var zDigits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~".split("").map(function(x) {
  return x.charCodeAt(0);
});
var zValue = [
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  0,
  1,
  2,
  3,
  4,
  5,
  6,
  7,
  8,
  9,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  10,
  11,
  12,
  13,
  14,
  15,
  16,
  17,
  18,
  19,
  20,
  21,
  22,
  23,
  24,
  25,
  26,
  27,
  28,
  29,
  30,
  31,
  32,
  33,
  34,
  35,
  -1,
  -1,
  -1,
  -1,
  36,
  -1,
  37,
  38,
  39,
  40,
  41,
  42,
  43,
  44,
  45,
  46,
  47,
  48,
  49,
  50,
  51,
  52,
  53,
  54,
  55,
  56,
  57,
  58,
  59,
  60,
  61,
  62,
  -1,
  -1,
  -1,
  63,
  -1
];
var Reader = class {
  constructor(array) {
    __publicField(this, "a");
    __publicField(this, "pos");
    this.a = array;
    this.pos = 0;
  }
  haveBytes() {
    return this.pos < this.a.length;
  }
  getByte() {
    const b = this.a[this.pos];
    this.pos++;
    if (this.pos > this.a.length)
      throw new RangeError("out of bounds");
    return b;
  }
  getChar() {
    return String.fromCharCode(this.getByte());
  }
  // Read base64-encoded unsigned integer.
  getInt() {
    let v = 0;
    let c;
    while (this.haveBytes() && (c = zValue[127 & this.getByte()]) >= 0) {
      v = (v << 6) + c;
    }
    this.pos--;
    return v >>> 0;
  }
};
var Writer = class {
  constructor() {
    __publicField(this, "a", []);
  }
  toByteArray(sourceType) {
    if (Array.isArray(sourceType)) {
      return this.a;
    }
    return new Uint8Array(this.a);
  }
  putByte(b) {
    this.a.push(b & 255);
  }
  // Write an ASCII character (s is a one-char string).
  putChar(s) {
    this.putByte(s.charCodeAt(0));
  }
  // Write a base64 unsigned integer.
  putInt(v) {
    const zBuf = [];
    if (v === 0) {
      this.putChar("0");
      return;
    }
    let i = 0;
    for (; v > 0; i++, v >>>= 6) {
      zBuf.push(zDigits[v & 63]);
    }
    for (let j = i - 1; j >= 0; j--) {
      this.putByte(zBuf[j]);
    }
  }
  // Copy from array at start to end.
  putArray(a, start, end) {
    for (let i = start; i < end; i++)
      this.a.push(a[i]);
  }
};
function checksum(arr) {
  let sum0 = 0, sum1 = 0, sum2 = 0, sum3 = 0, z = 0, N = arr.length;
  while (N >= 16) {
    sum0 = sum0 + arr[z + 0] | 0;
    sum1 = sum1 + arr[z + 1] | 0;
    sum2 = sum2 + arr[z + 2] | 0;
    sum3 = sum3 + arr[z + 3] | 0;
    sum0 = sum0 + arr[z + 4] | 0;
    sum1 = sum1 + arr[z + 5] | 0;
    sum2 = sum2 + arr[z + 6] | 0;
    sum3 = sum3 + arr[z + 7] | 0;
    sum0 = sum0 + arr[z + 8] | 0;
    sum1 = sum1 + arr[z + 9] | 0;
    sum2 = sum2 + arr[z + 10] | 0;
    sum3 = sum3 + arr[z + 11] | 0;
    sum0 = sum0 + arr[z + 12] | 0;
    sum1 = sum1 + arr[z + 13] | 0;
    sum2 = sum2 + arr[z + 14] | 0;
    sum3 = sum3 + arr[z + 15] | 0;
    z += 16;
    N -= 16;
  }
  while (N >= 4) {
    sum0 = sum0 + arr[z + 0] | 0;
    sum1 = sum1 + arr[z + 1] | 0;
    sum2 = sum2 + arr[z + 2] | 0;
    sum3 = sum3 + arr[z + 3] | 0;
    z += 4;
    N -= 4;
  }
  sum3 = ((sum3 + (sum2 << 8) | 0) + (sum1 << 16) | 0) + (sum0 << 24) | 0;
  switch (N) {
    case 3:
      sum3 = sum3 + (arr[z + 2] << 8) | 0;
    /* falls through */
    case 2:
      sum3 = sum3 + (arr[z + 1] << 16) | 0;
    /* falls through */
    case 1:
      sum3 = sum3 + (arr[z + 0] << 24) | 0;
  }
  return sum3 >>> 0;
}
function applyDelta(source, delta, opts) {
  let limit, total = 0;
  const zDelta = new Reader(delta);
  const lenSrc = source.length;
  const lenDelta = delta.length;
  limit = zDelta.getInt();
  if (zDelta.getChar() !== "\n")
    throw new Error("size integer not terminated by '\\n'");
  const zOut = new Writer();
  while (zDelta.haveBytes()) {
    let cnt = zDelta.getInt();
    let ofst;
    switch (zDelta.getChar()) {
      case "@":
        ofst = zDelta.getInt();
        if (zDelta.haveBytes() && zDelta.getChar() !== ",")
          throw new Error("copy command not terminated by ','");
        total += cnt;
        if (total > limit)
          throw new Error("copy exceeds output file size");
        if (ofst + cnt > lenSrc)
          throw new Error("copy extends past end of input");
        zOut.putArray(source, ofst, ofst + cnt);
        break;
      case ":":
        total += cnt;
        if (total > limit)
          throw new Error("insert command gives an output larger than predicted");
        if (cnt > lenDelta)
          throw new Error("insert count exceeds size of delta");
        zOut.putArray(zDelta.a, zDelta.pos, zDelta.pos + cnt);
        zDelta.pos += cnt;
        break;
      case ";":
        const out = zOut.toByteArray(source);
        if ((!opts || opts.verifyChecksum !== false) && cnt !== checksum(out))
          throw new Error("bad checksum");
        if (total !== limit)
          throw new Error("generated size does not match predicted size");
        return out;
      default:
        throw new Error("unknown delta operator");
    }
  }
  throw new Error("unterminated delta");
}
function applyStringDelta(source, delta, opts) {
  const deltaArray = applyDelta(new TextEncoder().encode(source), new TextEncoder().encode(delta), opts);
  return new TextDecoder().decode(new Uint8Array(deltaArray));
}

// src/herald.ts
var Emitter = class {
  constructor() {
    this.listeners = /* @__PURE__ */ new Map();
  }
  on(event, fn) {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, set = /* @__PURE__ */ new Set());
    set.add(fn);
    return this;
  }
  off(event, fn) {
    this.listeners.get(event)?.delete(fn);
    return this;
  }
  emit(event, ...args) {
    for (const fn of [...this.listeners.get(event) ?? []]) {
      try {
        fn(...args);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
};
var FATAL_CLOSE = /* @__PURE__ */ new Set([1002, 1003, 1007]);
var POLICY_CLOSE = /* @__PURE__ */ new Set([1008, 1009]);
var isTerminal = (code) => code >= 4400 && code <= 4499;
var TOKEN_EXPIRED = 4001;
var FIRST_START = 2 ** 40;
var isStart = (offset, epoch) => offset === 0 && epoch !== void 0 && parseInt(epoch, 36) >= FIRST_START;
var HeraldError = class extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
    this.name = "HeraldError";
  }
};
var Subscription = class extends Emitter {
  constructor(channel, client, options = {}) {
    super();
    this.channel = channel;
    this.client = client;
    this.options = options;
    this.active = false;
    /** The server sends deltas on this subscription (its `subscribed` said so). */
    this.delta = false;
    /** @internal Subscribes answered `unavailable` in a row (retried with backoff). */
    this._retries = 0;
    /** @internal A delta did not apply here: deltas are no longer asked for on this
     * subscription, so whatever made it fail cannot make the client reconnect again and
     * again. */
    this._noDelta = false;
  }
  /** Stops receiving the channel. */
  unsubscribe() {
    this.client._unsubscribe(this);
  }
  /** One page of who is present (channels with presence; subscribers only by default).
   * Pass the returned `cursor` back for the next page; it is absent on the last. */
  presence(cursor) {
    return this.client._query({ op: "presence", channel: this.channel, ...cursor ? { cursor } : {} });
  }
  /** How many connections and distinct users are present. */
  presenceStats() {
    return this.client._query({ op: "presence_stats", channel: this.channel });
  }
  /** The channel's last `limit` publications (history channels; subscribers by
   * default), oldest first, for a page to show before live messages. It moves
   * nothing: resuming stays the client's job. */
  history(opts = {}) {
    return this.client._query({ op: "history", channel: this.channel, limit: opts.limit ?? 100 });
  }
  /** @internal */
  _emit(event, ...args) {
    this.emit(event, ...args);
  }
};
var Client = class extends Emitter {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.state = "disconnected";
    this.transport = "websocket";
    this.subscriptions = /* @__PURE__ */ new Map();
    this.ws = null;
    this.sse = null;
    this.nextId = 1;
    this.started = false;
    this.pending = /* @__PURE__ */ new Map();
    this.queue = [];
    this.attempt = 0;
    this.wsFailures = 0;
    this.lastHeard = 0;
    this.pingSent = 0;
    this.heartbeatMs = 25e3;
    this.token = null;
    this.opened = false;
    /** Credentials refused in a row (see `maxAuthFailures`). */
    this.authFailures = 0;
    /** When the token in use was received (local clock), for refresh scheduling. */
    this.tokenAt = 0;
    /** When the last refresh was sent, so refreshes never come closer than a floor. */
    this.lastRefresh = 0;
    this.onOnline = () => this.reconnectNow();
    this.onOffline = () => this.drop("offline");
    this.opts = {
      minReconnectDelay: 500,
      maxReconnectDelay: 2e4,
      maxQueuedPublishes: 100,
      publishTimeout: 1e4,
      sseAfterFailures: 2,
      websocketRetryInterval: 6e4,
      maxAuthFailures: 3,
      withCredentials: false,
      ...options
    };
    const g = globalThis;
    if (typeof g.addEventListener === "function" && "onLine" in (g.navigator ?? {})) {
      g.addEventListener("online", this.onOnline);
      g.addEventListener("offline", this.onOffline);
    }
    if (this.opts.autoConnect !== false) this.connect();
  }
  /** Starts connecting (with `autoConnect: false`; otherwise the constructor did).
   * Once: after `close()`, make a new client. */
  connect() {
    if (this.started) return;
    this.started = true;
    this.dial();
  }
  /** Subscribes (or returns the existing subscription). History channels resume by
   * themselves after every reconnect. */
  subscribe(channel, options = {}) {
    let sub = this.subscriptions.get(channel);
    if (sub) return sub;
    sub = new Subscription(channel, this, options);
    this.subscriptions.set(channel, sub);
    if (this.state === "connected") {
      if (this.transport === "websocket") this.sendSubscribe(sub);
      else this.restartSse();
    }
    return sub;
  }
  /** Publishes JSON `data`; resolves once the server accepted it. While disconnected
   * the publish waits (at most `maxQueuedPublishes`, each `publishTimeout` ms). */
  publish(channel, data) {
    return new Promise((resolve, reject) => {
      const pending = { resolve, reject, publish: true };
      pending.timer = setTimeout(() => {
        this.queue = this.queue.filter((q) => q.pending !== pending);
        for (const [id, p] of this.pending) if (p === pending) this.pending.delete(id);
        reject(new HeraldError("timeout", "publish timed out"));
      }, this.opts.publishTimeout);
      const item = { frame: "", pending, channel, data };
      if (this.state === "connected") return this.sendPublish(item);
      if (this.queue.length >= this.opts.maxQueuedPublishes) {
        clearTimeout(pending.timer);
        return reject(new HeraldError("queue_full", "too many publishes waiting for a connection"));
      }
      this.queue.push(item);
    });
  }
  /** Closes for good: no reconnect. */
  close() {
    this.setState("closed");
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.refreshTimer);
    clearTimeout(this.wsRetryTimer);
    clearInterval(this.heartbeatTimer);
    this.teardown(1e3);
    const g = globalThis;
    if (typeof g.removeEventListener === "function") {
      g.removeEventListener("online", this.onOnline);
      g.removeEventListener("offline", this.onOffline);
    }
    const closed = new HeraldError("closed", "client closed");
    for (const q of this.queue) this.fail(q.pending, closed);
    this.queue = [];
    this.abandonRequests();
  }
  /** The connection is gone: whatever it carried will not be answered. Publishes sent
   * on it fail with `unknown_outcome` (the server may have taken them); subscribes and
   * refreshes are forgotten, not failed: the next welcome sends them again, and a
   * subscription must not hear an error for a request nobody refused. */
  abandonRequests() {
    const unknown = () => new HeraldError(
      "unknown_outcome",
      "the connection closed before the server answered; the message may or may not have been published"
    );
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      if (p.publish) this.fail(p, unknown());
      else if (p.query) this.fail(p, new HeraldError("disconnected", "the connection closed before the answer"));
    }
  }
  // ---- connection ----
  setState(s) {
    if (this.state === s || this.state === "closed") return;
    this.state = s;
    this.emit("state", s);
  }
  async dial() {
    if (this.state === "closed") return;
    this.setState("connecting");
    this.opened = false;
    try {
      this.token = this.opts.getToken ? await this.opts.getToken() ?? null : null;
      this.tokenAt = Date.now();
    } catch (e) {
      this.emit("error", e);
      return this.scheduleReconnect();
    }
    if (this.state === "closed") return;
    if (this.transport === "sse") return this.openSse();
    const WS = this.opts.WebSocket ?? globalThis.WebSocket;
    if (!WS) throw new Error("no WebSocket implementation: pass options.WebSocket");
    const url = this.token ? withParam(this.url, "access_token", this.token) : this.url;
    let ws;
    try {
      ws = new WS(url);
    } catch (e) {
      this.emit("error", e);
      return this.onWsFailure();
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      this.opened = true;
      this.wsFailures = 0;
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      if (typeof ev.data === "string") this.onFrame(ev.data);
      else this.onBinary(new Uint8Array(ev.data));
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.onClosed(ev.code ?? 1006, ev.reason ?? "");
    };
    ws.onerror = () => {
      if (this.ws !== ws || this.opened) return;
      this.ws = null;
      this.onClosed(1006, "handshake failed");
    };
  }
  onWsFailure() {
    this.wsFailures++;
    const n = this.opts.sseAfterFailures;
    if (n > 0 && this.wsFailures >= n && this.transport === "websocket") {
      this.transport = "sse";
      this.emit("transport", "sse");
      clearTimeout(this.wsRetryTimer);
      this.wsRetryTimer = setTimeout(() => {
        this.transport = "websocket";
        this.wsFailures = 0;
        this.emit("transport", "websocket");
        if (this.state === "connected") this.drop("websocket retry");
      }, this.opts.websocketRetryInterval);
    }
    this.scheduleReconnect();
  }
  onClosed(code, reason) {
    clearInterval(this.heartbeatTimer);
    clearTimeout(this.refreshTimer);
    this.abandonRequests();
    for (const sub of this.subscriptions.values()) sub.active = false;
    if (this.state === "closed") return;
    this.setState("disconnected");
    if (!this.opened && this.transport === "websocket") return this.onWsFailure();
    if (FATAL_CLOSE.has(code)) {
      this.emit("error", new HeraldError("closed", `server closed the connection: ${code} ${reason}`));
      this.close();
      return;
    }
    if (isTerminal(code)) {
      const e = new HeraldError("disconnected", `disconnected by the server: ${code} ${reason}`);
      e.closeCode = code;
      this.emit("error", e);
      this.close();
      return;
    }
    if (code === 1012 || code === 1001) this.attempt = 0;
    if (POLICY_CLOSE.has(code)) this.attempt = Math.max(this.attempt, 16);
    this.scheduleReconnect(code === 1012 || code === TOKEN_EXPIRED);
  }
  scheduleReconnect(soon = false) {
    if (this.state === "closed") return;
    clearTimeout(this.reconnectTimer);
    const bound = Math.min(
      this.opts.maxReconnectDelay,
      this.opts.minReconnectDelay * 2 ** Math.min(this.attempt, 16)
    );
    this.attempt++;
    const delay = soon ? Math.random() * this.opts.minReconnectDelay : Math.random() * bound;
    this.reconnectTimer = setTimeout(() => this.dial(), delay);
  }
  reconnectNow() {
    if (this.state === "connected" || this.state === "closed") return;
    this.attempt = 0;
    clearTimeout(this.reconnectTimer);
    this.dial();
  }
  /** Drops the current connection and reconnects (dead peer, offline, transport). */
  drop(why) {
    if (this.state === "closed" || !this.ws && !this.sse) return;
    this.teardown(4e3, why);
    this.onClosed(1006, why);
  }
  teardown(code, reason = "") {
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      try {
        ws.close(code, reason);
      } catch {
        ws.close();
      }
    }
    this.sse?.abort();
    this.sse = null;
  }
  // ---- frames ----
  onFrame(text) {
    this.lastHeard = Date.now();
    this.pingSent = 0;
    let f;
    try {
      f = JSON.parse(text);
    } catch {
      return;
    }
    switch (f.op) {
      case "welcome":
        return this.onWelcome(f);
      case "message":
        if (f.base64 !== void 0) return this.onMessage(f.channel, base64(f.base64), f.offset, f.epoch);
        return this.onText(text, f);
      case "subscribed":
        return this.onSubscribed(f);
      case "epoch": {
        const sub = this.subscriptions.get(f.channel);
        if (sub && isStart(sub.offset, sub.epoch)) sub.epoch = f.epoch;
        return;
      }
      case "reset": {
        const sub = this.subscriptions.get(f.channel);
        if (!sub) return;
        sub.offset = f.offset;
        sub.epoch = f.epoch;
        sub._emit("reset", f);
        sub._emit("recovered", false);
        return;
      }
      case "unsubscribed":
        if (f.id === void 0) {
          const sub = this.subscriptions.get(f.channel);
          if (!sub) return;
          this.subscriptions.delete(f.channel);
          sub.active = false;
          sub._emit("unsubscribed", f);
          return;
        }
        return this.settle(f.id, f);
      case "published":
      case "refreshed":
      case "pong":
      case "presence":
      case "presence_stats":
      case "history":
      case "result":
        return this.settle(f.id, f);
      case "join":
      case "leave": {
        const { op, channel, ...member } = f;
        this.subscriptions.get(channel)?._emit(op, member);
        return;
      }
      case "error": {
        const err = new HeraldError(f.code, f.message);
        if (f.hook_code !== void 0) err.hookCode = f.hook_code;
        if (f.id !== void 0 && this.pending.has(f.id)) return this.settle(f.id, void 0, err);
        if (f.channel) this.subscriptions.get(f.channel)?._emit("error", err);
        this.emit("error", err);
        return;
      }
    }
  }
  onWelcome(f) {
    this.heartbeatMs = f.heartbeat_ms || 25e3;
    this.attempt = 0;
    this.authFailures = 0;
    this.setState("connected");
    this.emit("welcome", f);
    this.startHeartbeat();
    this.scheduleRefresh();
    if (this.transport === "websocket") {
      for (const sub of this.subscriptions.values()) this.sendSubscribe(sub);
    }
    const queued = this.queue;
    this.queue = [];
    for (const q of queued) this.sendPublish(q);
  }
  onSubscribed(f) {
    let sub = this.subscriptions.get(f.channel);
    if (!sub) {
      if (f.id !== void 0) return;
      sub = new Subscription(f.channel, this);
      this.subscriptions.set(f.channel, sub);
      this.emit("subscription", sub);
    }
    if (f.id !== void 0) this.pending.delete(f.id);
    sub.active = true;
    sub._retries = 0;
    sub.delta = f.delta === "fossil";
    sub._base = void 0;
    const atStart = isStart(sub.offset, sub.epoch);
    const resumed = f.recovered === true && (sub.epoch === f.epoch || atStart);
    if (f.offset !== void 0 && !resumed) {
      const ahead = sub.epoch === f.epoch && sub.offset !== void 0 && sub.offset > f.offset;
      if (!ahead) sub.offset = f.offset;
      sub.epoch = f.epoch;
    }
    sub._emit("subscribed", f);
    if (f.recovered !== void 0) sub._emit("recovered", f.recovered);
  }
  /** A text delivery, whole or a delta. A delta that does not apply to the data held
   * (it never should) drops the connection: the resume after it starts whole, from the
   * last delivered offset, so nothing is lost. */
  onText(text, f) {
    const sub = this.subscriptions.get(f.channel);
    if (!sub) return;
    if (f.delta === void 0) {
      if (sub.delta && f.offset !== void 0) {
        const raw = rawData(text, f.channel);
        sub._base = raw === void 0 ? void 0 : { offset: f.offset, text: raw };
      }
      return this.onMessage(f.channel, f.data, f.offset, f.epoch);
    }
    if (!sub.active) return;
    const base = sub._base;
    let data;
    try {
      if (!base || base.offset + 1 !== f.offset) throw new Error("no base for it");
      const whole = applyStringDelta(base.text, f.delta);
      data = JSON.parse(whole);
      sub._base = { offset: f.offset, text: whole };
    } catch (e) {
      sub._base = void 0;
      sub._noDelta = true;
      this.emit("error", new HeraldError("delta", `a delta on ${f.channel} at ${f.offset} did not apply: ${e}`));
      return this.drop("delta");
    }
    this.onMessage(f.channel, data, f.offset, f.epoch);
  }
  onMessage(channel, data, offset, epoch) {
    const sub = this.subscriptions.get(channel);
    if (!sub) return;
    if (offset !== void 0) sub.offset = offset;
    if (epoch !== void 0) sub.epoch = epoch;
    sub._emit("message", data, offset === void 0 ? { channel } : { channel, offset });
  }
  onBinary(b) {
    this.lastHeard = Date.now();
    this.pingSent = 0;
    let offset;
    let i = 0;
    if (b[0] === 0) {
      offset = Number(new DataView(b.buffer, b.byteOffset + 1, 8).getBigUint64(0));
      i = 9;
    }
    const len = b[i];
    const channel = new TextDecoder().decode(b.subarray(i + 1, i + 1 + len));
    this.onMessage(channel, b.subarray(i + 1 + len), offset);
  }
  settle(id, value, err) {
    if (id === void 0) return;
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    clearTimeout(p.timer);
    if (err) p.reject(err);
    else p.resolve(value);
  }
  fail(p, err) {
    clearTimeout(p.timer);
    p.reject(err);
  }
  send(frame) {
    if (!this.ws || this.ws.readyState !== 1) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }
  sendSubscribe(sub) {
    const ask = this.opts.getSubscriptionToken;
    if (!ask) return this.sendSubscribeFrame(sub, null);
    Promise.resolve().then(() => ask(sub.channel)).then(
      (token) => {
        if (this.state === "connected" && this.subscriptions.get(sub.channel) === sub && !sub.active) {
          this.sendSubscribeFrame(sub, token ?? null);
        }
      },
      (e) => sub._emit("error", new HeraldError("token", `getSubscriptionToken failed: ${e}`))
    );
  }
  sendSubscribeFrame(sub, token) {
    const id = this.nextId++;
    this.pending.set(id, {
      resolve: () => {
      },
      reject: (e) => {
        sub._emit("error", e);
        if (e.code !== "unavailable") return;
        const bound = Math.min(this.opts.maxReconnectDelay, this.opts.minReconnectDelay * 2 ** sub._retries++);
        setTimeout(() => {
          if (this.state === "connected" && this.subscriptions.get(sub.channel) === sub && !sub.active) {
            this.sendSubscribe(sub);
          }
        }, Math.random() * bound);
      }
    });
    const frame = { op: "subscribe", channel: sub.channel, id, recover: true };
    if (sub.offset !== void 0 && sub.epoch) frame.since = { offset: sub.offset, epoch: sub.epoch };
    if (token) frame.token = token;
    if (sub.options.delta && !sub._noDelta) frame.delta = sub.options.delta;
    this.send(frame);
  }
  sendPublish(q) {
    if (this.transport === "sse") {
      this.httpPublish(q);
      return;
    }
    const id = this.nextId++;
    this.pending.set(id, q.pending);
    if (!this.send({ op: "publish", channel: q.channel, data: q.data, id })) {
      this.pending.delete(id);
      this.queue.push(q);
    }
  }
  /** Calls the application's backend (the server's `[hooks.rpc]`): resolves with its
   * result. Rejects with `refused` (the backend said no; its code in `hookCode`),
   * `unavailable` (it did not answer), `forbidden`, `rate_limited`, or `disconnected`
   * (the connection dropped first: whether the backend ran it is unknown). */
  rpc(method, data = null) {
    return this._query({ op: "rpc", method, data }).then((f) => f.data);
  }
  /** @internal A question answered by a frame with its id (presence, presence_stats). */
  _query(frame) {
    return new Promise((resolve, reject) => {
      if (this.state !== "connected" || this.transport !== "websocket") {
        return reject(new HeraldError("disconnected", "not connected over WebSocket"));
      }
      const id = this.nextId++;
      const p = { resolve, reject, query: true };
      p.timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new HeraldError("timeout", `${String(frame.op)} timed out`));
      }, this.opts.publishTimeout);
      this.pending.set(id, p);
      this.send({ ...frame, id });
    });
  }
  /** @internal */
  _unsubscribe(sub) {
    if (this.subscriptions.get(sub.channel) !== sub) return;
    this.subscriptions.delete(sub.channel);
    sub.active = false;
    if (this.transport === "websocket") this.send({ op: "unsubscribe", channel: sub.channel, id: this.nextId++ });
    else if (this.state === "connected") this.restartSse();
  }
  // ---- liveness and tokens ----
  startHeartbeat() {
    clearInterval(this.heartbeatTimer);
    this.lastHeard = Date.now();
    this.pingSent = 0;
    const margin = Math.max(this.heartbeatMs / 2, 5e3);
    const tick = Math.max(Math.min(this.heartbeatMs, margin) / 4, 50);
    this.heartbeatTimer = setInterval(() => {
      const now = Date.now();
      if (this.pingSent && now - this.pingSent > margin) return this.drop("heartbeat timeout");
      if (!this.pingSent && now - this.lastHeard > this.heartbeatMs + (this.transport === "sse" ? margin : 0)) {
        if (this.transport === "sse") return this.drop("heartbeat timeout");
        this.pingSent = now;
        this.send({ op: "ping" });
      }
    }, tick);
  }
  scheduleRefresh() {
    clearTimeout(this.refreshTimer);
    const claims = this.token ? tokenClaims(this.token) : void 0;
    if (!claims?.exp || !this.opts.getToken || this.transport !== "websocket") return;
    const lifetime = claims.iat ? (claims.exp - claims.iat) * 1e3 : claims.exp * 1e3 - this.tokenAt;
    const due = this.tokenAt + Math.max(lifetime * 0.8, lifetime - 6e4);
    const at = Math.max(due, this.lastRefresh + 5e3) - Date.now();
    this.refreshTimer = setTimeout(async () => {
      try {
        this.lastRefresh = Date.now();
        const t = await this.opts.getToken();
        if (!t || this.state !== "connected") return;
        this.token = t;
        this.tokenAt = Date.now();
        const id = this.nextId++;
        this.pending.set(id, {
          resolve: () => this.scheduleRefresh(),
          reject: (e) => this.emit("error", e)
        });
        this.send({ op: "refresh", token: t, id });
      } catch (e) {
        this.emit("error", e);
      }
    }, at);
  }
  // ---- Server-Sent Events ----
  sseBase() {
    if (this.opts.sseUrl) return this.opts.sseUrl;
    const u = new URL(this.url);
    u.protocol = u.protocol === "wss:" ? "https:" : "http:";
    u.pathname = u.pathname.replace(/\/ws$/, "") + "/sse";
    u.search = "";
    return u.toString();
  }
  restartSse() {
    this.sse?.abort();
    this.sse = null;
    this.dial();
  }
  async openSse() {
    const channels = [...this.subscriptions.keys()];
    if (channels.length === 0) {
      this.opened = true;
      this.onWelcome({ op: "welcome", heartbeat_ms: 2 ** 30 });
      return;
    }
    const u = new URL(this.sseBase());
    for (const c of channels) u.searchParams.append("channel", c);
    const positions = [...this.subscriptions.values()].filter((s) => s.offset !== void 0 && s.epoch).map((s) => `${s.channel}=${s.offset}~${s.epoch}`);
    if (positions.length) u.searchParams.set("last_event_id", positions.join(","));
    const subs = [...this.subscriptions.values()];
    if (subs.some((s) => s.options.delta) && !subs.some((s) => s._noDelta)) u.searchParams.set("delta", "fossil");
    const abort = new AbortController();
    this.sse = abort;
    const headers = { accept: "text/event-stream" };
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    try {
      const r = await fetch(u, { headers, signal: abort.signal, cache: "no-store", credentials: this.credentials() });
      if (!r.ok || !r.body) {
        const body = await r.json().catch(() => ({}));
        const err = new HeraldError(body.code ?? "sse", body.message ?? `SSE refused: ${r.status}`);
        if (r.status === 401 || r.status === 403) {
          this.authFailures++;
          const max = this.opts.maxAuthFailures;
          if (max > 0 && this.authFailures >= max) {
            this.sse = null;
            this.emit("error", err);
            this.close();
            return;
          }
        }
        throw err;
      }
      this.opened = true;
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      let closeCode = 1006;
      for (; ; ) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          this.lastHeard = Date.now();
          let event = "message";
          const data = [];
          for (const line of block.split("\n")) {
            if (line.startsWith("data: ")) data.push(line.slice(6));
            else if (line.startsWith("event: ")) event = line.slice(7);
          }
          if (!data.length) continue;
          if (event === "close") closeCode = JSON.parse(data.join("\n")).code;
          else this.onFrame(data.join("\n"));
        }
      }
      if (this.sse === abort) {
        this.sse = null;
        this.onClosed(closeCode, "stream ended");
      }
    } catch (e) {
      if (this.sse !== abort) return;
      this.sse = null;
      this.emit("error", e);
      if (!this.opened) {
        this.transport = "websocket";
        this.wsFailures = 0;
        this.emit("transport", "websocket");
      }
      this.onClosed(1006, "stream failed");
    }
  }
  credentials() {
    return this.opts.withCredentials ? "include" : "same-origin";
  }
  async httpPublish(q) {
    const u = new URL(this.sseBase());
    u.pathname = u.pathname + "/publish";
    const headers = { "content-type": "application/json" };
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    try {
      const r = await fetch(u, {
        method: "POST",
        headers,
        body: JSON.stringify({ channel: q.channel, data: q.data }),
        credentials: this.credentials()
      });
      const body = await r.json().catch(() => ({}));
      clearTimeout(q.pending.timer);
      if (r.ok) q.pending.resolve(body);
      else q.pending.reject(new HeraldError(body.code ?? "http", body.message ?? `HTTP ${r.status}`));
    } catch (e) {
      this.fail(q.pending, e);
    }
  }
};
function withParam(url, k, v) {
  return url + (url.includes("?") ? "&" : "?") + `${k}=${encodeURIComponent(v)}`;
}
function tokenClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part));
  } catch {
    return void 0;
  }
}
function rawData(frame, channel) {
  const head = `{"op":"message","channel":"${channel}","data":`;
  const end = frame.lastIndexOf(',"offset":');
  return frame.startsWith(head) && end >= head.length ? frame.slice(head.length, end) : void 0;
}
function base64(s) {
  return Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
}
export {
  Client,
  HeraldError,
  Subscription
};
/*! Bundled license information:

fossil-delta/fossil-delta.js:
  (*! (c) Dmitry Chestnykh, D. Richard Hipp | BSD License | https://github.com/dchest/fossil-delta-js/ *)
*/
