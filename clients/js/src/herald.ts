// Herald's JavaScript client: one connection, any number of subscriptions, and the
// work every real-time page gets wrong by hand: reconnecting with jittered backoff,
// resubscribing with the last offset seen (so history channels lose nothing across
// drops and deploys), noticing dead connections, refreshing tokens, queueing
// publishes while offline, and falling back to Server-Sent Events where WebSocket is
// refused, and applying Fossil deltas where asked. Browsers and Node 20+; one runtime
// dependency (fossil-delta, bundled into dist).

import { applyStringDelta } from 'fossil-delta';

export type State = 'connecting' | 'connected' | 'disconnected' | 'closed';
export type Transport = 'websocket' | 'sse';

export interface Options {
  /** Returns a connection token (JWT); called before every connect and refresh. */
  getToken?: () => Promise<string | null | undefined> | string | null | undefined;
  /** A WebSocket implementation where the runtime has none (e.g. the `ws` package). */
  WebSocket?: unknown;
  /** Backoff bounds for reconnects, ms (full jitter between 0 and the bound). */
  minReconnectDelay?: number;
  maxReconnectDelay?: number;
  /** Publishes held while disconnected, at most, and how long each may wait, ms. */
  maxQueuedPublishes?: number;
  publishTimeout?: number;
  /** Failed WebSocket attempts in a row (never opened) before trying SSE; 0: never. */
  sseAfterFailures?: number;
  /** While on SSE, try WebSocket again after this long, ms. */
  websocketRetryInterval?: number;
  /** Where SSE lives, when not next to the WebSocket URL (`.../ws` → `.../sse`). */
  sseUrl?: string;
  /** Refusals of the client's credentials in a row (401/403 on the SSE endpoint,
   * which, unlike a WebSocket handshake, shows its status) before the client stops:
   * state `closed`, and an `error` with the server's code and reason. 0: never. */
  maxAuthFailures?: number;
  /** Connect at once (default); `false`: only when `connect()` is called. */
  autoConnect?: boolean;
  /** Send the page's cookies on SSE requests to a gateway on another origin (cookie
   * sessions through the server's connect hook; `fetch` with `credentials: 'include'`).
   * WebSocket handshakes carry cookies anyway. Default false. */
  withCredentials?: boolean;
  /** Returns a subscription token (JWT with a `channel` claim) for a channel the
   * connection's own token does not open; called before every subscribe of that
   * channel (after reconnects too: tokens expire). Return null for channels that need
   * none. WebSocket only. */
  getSubscriptionToken?: (channel: string) => Promise<string | null | undefined> | string | null | undefined;
}

/** How a subscription is made. */
export interface SubscribeOptions {
  /** `'fossil'`: on channels whose rule allows it, publications after the first may
   * arrive as Fossil deltas against the one before; the client applies them, and
   * `message` always carries the whole data. Saves bandwidth on documents that change
   * a little at a time (scores, prices, dashboards). */
  delta?: 'fossil';
}

export interface MessageContext {
  channel: string;
  /** Present on history channels. */
  offset?: number;
}

type Listener = (...args: any[]) => void;

/** What a subscription emits (a misspelt name is a type error). */
export interface SubscriptionEvents {
  /** A publication: its data (JSON, or Uint8Array for binary) and where it came from. */
  message: (data: any, ctx: MessageContext) => void;
  /** The server confirmed the subscription (again after every reconnect). */
  subscribed: (frame: any) => void;
  /** After a resume: whether everything missed arrived (false: reload from the source). */
  recovered: (ok: boolean) => void;
  /** The channel's stream restarted (new epoch); positions start over. */
  reset: (frame: any) => void;
  /** A refusal (forbidden, unavailable, ...). */
  error: (e: HeraldError) => void;
  /** The server ended the subscription (control API); it is not asked for again. */
  unsubscribed: (frame: any) => void;
  /** Presence with join_leave: someone joined or left. */
  join: (member: Member) => void;
  leave: (member: Member) => void;
}

/** What the client emits. */
export interface ClientEvents {
  state: (state: State) => void;
  welcome: (frame: any) => void;
  transport: (transport: Transport) => void;
  error: (e: Error) => void;
  /** A subscription the server made (control API, a token's subscribe claim, the
   * personal channel), before its first message. */
  subscription: (sub: Subscription) => void;
}

class Emitter<E extends { [K in keyof E]: Listener }> {
  private listeners = new Map<keyof E, Set<Listener>>();
  on<K extends keyof E>(event: K, fn: E[K]): this {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(fn);
    return this;
  }
  off<K extends keyof E>(event: K, fn: E[K]): this {
    this.listeners.get(event)?.delete(fn);
    return this;
  }
  protected emit<K extends keyof E>(event: K, ...args: Parameters<E[K]>): void {
    for (const fn of [...(this.listeners.get(event) ?? [])]) {
      try {
        fn(...args);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
}

/** Close codes after which reconnecting cannot help: this client broke the protocol. */
const FATAL_CLOSE = new Set([1002, 1003, 1007]);
/** The client broke a policy (rate limit, heartbeat, size): reconnect, but slowly. */
const POLICY_CLOSE = new Set([1008, 1009]);
/** Closed by the backend through the control API not to come back (a ban, a sign-out):
 * 4400-4499 (PROTOCOL.md). 4000-4399 reconnect with backoff. */
const isTerminal = (code: number): boolean => code >= 4400 && code <= 4499;
/** The connection's token expired: get a new one, then reconnect. */
const TOKEN_EXPIRED = 4001;
/** Epochs from 2^40 up are start tokens (PROTOCOL.md): a position at offset 0 in one is
 * a start, before the first publication of a channel that had none when it was read. */
const FIRST_START = 2 ** 40;
const isStart = (offset: number | undefined, epoch: string | undefined): boolean =>
  offset === 0 && epoch !== undefined && parseInt(epoch, 36) >= FIRST_START;

interface Pending {
  resolve: (v: any) => void;
  reject: (e: Error) => void;
  timer?: ReturnType<typeof setTimeout>;
  /** A publish (its outcome matters after a drop); other requests belong to their
   * connection and are sent again after the next welcome. */
  publish?: boolean;
  /** A question (presence): fails with `disconnected` when its connection drops. */
  query?: boolean;
}

interface Queued {
  frame: string;
  pending: Pending;
  channel: string;
  data: unknown;
}

export class HeraldError extends Error {
  /** For `refused` (a hook's error answer): the application backend's own code. */
  hookCode?: number;
  constructor(
    public code: string,
    message: string,
  ) {
    super(message);
    this.name = 'HeraldError';
  }
}

/** A connection present in a channel: its user (the token's `sub`), its id, and the
 * token's `info`. */
export interface Member {
  user: string;
  conn: string;
  info?: unknown;
}

/** One channel's subscription. Events: `message` (data, ctx), `subscribed`,
 * `recovered` (ok: boolean), `reset`, `error` (HeraldError), `unsubscribed` (the server
 * ended it: control API), `join` and `leave` (Member: presence with join_leave). */
export class Subscription extends Emitter<SubscriptionEvents> {
  /** The last position seen, on history channels. */
  offset?: number;
  epoch?: string;
  active = false;
  /** The server sends deltas on this subscription (its `subscribed` said so). */
  delta = false;
  /** @internal Subscribes answered `unavailable` in a row (retried with backoff). */
  _retries = 0;
  /** @internal With deltas: the last positioned text delivery's offset and raw JSON
   * text, which the next delta applies to. */
  _base?: { offset: number; text: string };
  /** @internal A delta did not apply here: deltas are no longer asked for on this
   * subscription, so whatever made it fail cannot make the client reconnect again and
   * again. */
  _noDelta = false;
  constructor(
    readonly channel: string,
    private client: Client,
    /** What was asked for (see SubscribeOptions). */
    readonly options: SubscribeOptions = {},
  ) {
    super();
  }
  /** Stops receiving the channel. */
  unsubscribe(): void {
    this.client._unsubscribe(this);
  }
  /** One page of who is present (channels with presence; subscribers only by default).
   * Pass the returned `cursor` back for the next page; it is absent on the last. */
  presence(cursor?: string): Promise<{ members: Member[]; cursor?: string }> {
    return this.client._query({ op: 'presence', channel: this.channel, ...(cursor ? { cursor } : {}) });
  }
  /** How many connections and distinct users are present. */
  presenceStats(): Promise<{ connections: number; users: number }> {
    return this.client._query({ op: 'presence_stats', channel: this.channel });
  }
  /** The channel's last `limit` publications (history channels; subscribers by
   * default), oldest first, for a page to show before live messages. It moves
   * nothing: resuming stays the client's job. */
  history(opts: { limit?: number } = {}): Promise<{
    epoch: string;
    offset: number;
    publications: { offset: number; data?: unknown; binary?: string }[];
  }> {
    return this.client._query({ op: 'history', channel: this.channel, limit: opts.limit ?? 100 });
  }
  /** @internal */
  _emit<K extends keyof SubscriptionEvents>(event: K, ...args: Parameters<SubscriptionEvents[K]>): void {
    this.emit(event, ...args);
  }
}

/** A Herald connection. Events: `state` (State), `welcome` (frame), `error`,
 * `subscription` (a Subscription the server made: control API). */
export class Client extends Emitter<ClientEvents> {
  state: State = 'disconnected';
  transport: Transport = 'websocket';
  readonly subscriptions = new Map<string, Subscription>();

  private opts: Required<Omit<Options, 'getToken' | 'WebSocket' | 'sseUrl' | 'autoConnect' | 'getSubscriptionToken'>> &
    Options;
  private ws: any = null;
  private sse: AbortController | null = null;
  private nextId = 1;
  private started = false;
  private pending = new Map<number, Pending>();
  private queue: Queued[] = [];
  private attempt = 0;
  private wsFailures = 0;
  private reconnectTimer?: ReturnType<typeof setTimeout>;
  private heartbeatTimer?: ReturnType<typeof setInterval>;
  private refreshTimer?: ReturnType<typeof setTimeout>;
  private wsRetryTimer?: ReturnType<typeof setTimeout>;
  private lastHeard = 0;
  private pingSent = 0;
  private heartbeatMs = 25000;
  private token: string | null = null;
  private opened = false;
  /** Credentials refused in a row (see `maxAuthFailures`). */
  private authFailures = 0;
  /** When the token in use was received (local clock), for refresh scheduling. */
  private tokenAt = 0;
  /** When the last refresh was sent, so refreshes never come closer than a floor. */
  private lastRefresh = 0;
  private onOnline = () => this.reconnectNow();
  private onOffline = () => this.drop('offline');

  constructor(
    readonly url: string,
    options: Options = {},
  ) {
    super();
    this.opts = {
      minReconnectDelay: 500,
      maxReconnectDelay: 20000,
      maxQueuedPublishes: 100,
      publishTimeout: 10000,
      sseAfterFailures: 2,
      websocketRetryInterval: 60000,
      maxAuthFailures: 3,
      withCredentials: false,
      ...options,
    };
    const g = globalThis as any;
    if (typeof g.addEventListener === 'function' && 'onLine' in (g.navigator ?? {})) {
      g.addEventListener('online', this.onOnline);
      g.addEventListener('offline', this.onOffline);
    }
    if (this.opts.autoConnect !== false) this.connect();
  }

  /** Starts connecting (with `autoConnect: false`; otherwise the constructor did).
   * Once: after `close()`, make a new client. */
  connect(): void {
    if (this.started) return;
    this.started = true;
    this.dial();
  }

  /** Subscribes (or returns the existing subscription). History channels resume by
   * themselves after every reconnect. */
  subscribe(channel: string, options: SubscribeOptions = {}): Subscription {
    let sub = this.subscriptions.get(channel);
    if (sub) return sub;
    sub = new Subscription(channel, this, options);
    this.subscriptions.set(channel, sub);
    if (this.state === 'connected') {
      if (this.transport === 'websocket') this.sendSubscribe(sub);
      else this.restartSse();
    }
    return sub;
  }

  /** Publishes JSON `data`; resolves once the server accepted it. While disconnected
   * the publish waits (at most `maxQueuedPublishes`, each `publishTimeout` ms). */
  publish(channel: string, data: unknown): Promise<unknown> {
    return new Promise((resolve, reject) => {
      const pending: Pending = { resolve, reject, publish: true };
      pending.timer = setTimeout(() => {
        this.queue = this.queue.filter((q) => q.pending !== pending);
        for (const [id, p] of this.pending) if (p === pending) this.pending.delete(id);
        reject(new HeraldError('timeout', 'publish timed out'));
      }, this.opts.publishTimeout);
      const item: Queued = { frame: '', pending, channel, data };
      if (this.state === 'connected') return this.sendPublish(item);
      if (this.queue.length >= this.opts.maxQueuedPublishes) {
        clearTimeout(pending.timer);
        return reject(new HeraldError('queue_full', 'too many publishes waiting for a connection'));
      }
      this.queue.push(item);
    });
  }

  /** Closes for good: no reconnect. */
  close(): void {
    this.setState('closed');
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.refreshTimer);
    clearTimeout(this.wsRetryTimer);
    clearInterval(this.heartbeatTimer);
    this.teardown(1000);
    const g = globalThis as any;
    if (typeof g.removeEventListener === 'function') {
      g.removeEventListener('online', this.onOnline);
      g.removeEventListener('offline', this.onOffline);
    }
    const closed = new HeraldError('closed', 'client closed');
    for (const q of this.queue) this.fail(q.pending, closed);
    this.queue = [];
    this.abandonRequests();
  }

  /** The connection is gone: whatever it carried will not be answered. Publishes sent
   * on it fail with `unknown_outcome` (the server may have taken them); subscribes and
   * refreshes are forgotten, not failed: the next welcome sends them again, and a
   * subscription must not hear an error for a request nobody refused. */
  private abandonRequests(): void {
    const unknown = () =>
      new HeraldError(
        'unknown_outcome',
        'the connection closed before the server answered; the message may or may not have been published',
      );
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      if (p.publish) this.fail(p, unknown());
      else if (p.query) this.fail(p, new HeraldError('disconnected', 'the connection closed before the answer'));
    }
  }

  // ---- connection ----

  private setState(s: State): void {
    if (this.state === s || this.state === 'closed') return;
    this.state = s;
    this.emit('state', s);
  }

  private async dial(): Promise<void> {
    if (this.state === 'closed') return;
    this.setState('connecting');
    this.opened = false;
    try {
      this.token = this.opts.getToken ? ((await this.opts.getToken()) ?? null) : null;
      this.tokenAt = Date.now();
    } catch (e) {
      this.emit('error', e as Error);
      return this.scheduleReconnect();
    }
    // close() may have run while the token was being fetched.
    if ((this.state as State) === 'closed') return;
    if (this.transport === 'sse') return this.openSse();
    const WS = (this.opts.WebSocket ?? (globalThis as any).WebSocket) as any;
    if (!WS) throw new Error('no WebSocket implementation: pass options.WebSocket');
    const url = this.token ? withParam(this.url, 'access_token', this.token) : this.url;
    let ws: any;
    try {
      ws = new WS(url);
    } catch (e) {
      this.emit('error', e as Error);
      return this.onWsFailure();
    }
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    ws.onopen = () => {
      this.opened = true;
      this.wsFailures = 0;
    };
    ws.onmessage = (ev: any) => {
      if (this.ws !== ws) return;
      if (typeof ev.data === 'string') this.onFrame(ev.data);
      else this.onBinary(new Uint8Array(ev.data));
    };
    ws.onclose = (ev: any) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.onClosed(ev.code ?? 1006, ev.reason ?? '');
    };
    // A handshake that fails fires `error` and, in browsers, `close`; some runtimes
    // (Node 20's) fire only `error`. Either ends this attempt once.
    ws.onerror = () => {
      if (this.ws !== ws || this.opened) return;
      this.ws = null;
      this.onClosed(1006, 'handshake failed');
    };
  }

  private onWsFailure(): void {
    this.wsFailures++;
    const n = this.opts.sseAfterFailures;
    if (n > 0 && this.wsFailures >= n && this.transport === 'websocket') {
      // The backoff keeps growing across transports: against a dead server, switching
      // must not start it over (that made a flood of attempts).
      this.transport = 'sse';
      this.emit('transport', 'sse');
      // Return to WebSocket later: the network may have changed.
      clearTimeout(this.wsRetryTimer);
      this.wsRetryTimer = setTimeout(() => {
        this.transport = 'websocket';
        this.wsFailures = 0;
        this.emit('transport', 'websocket');
        if (this.state === 'connected') this.drop('websocket retry');
      }, this.opts.websocketRetryInterval);
    }
    this.scheduleReconnect();
  }

  private onClosed(code: number, reason: string): void {
    clearInterval(this.heartbeatTimer);
    clearTimeout(this.refreshTimer);
    this.abandonRequests();
    for (const sub of this.subscriptions.values()) sub.active = false;
    if (this.state === 'closed') return;
    this.setState('disconnected');
    if (!this.opened && this.transport === 'websocket') return this.onWsFailure();
    if (FATAL_CLOSE.has(code)) {
      this.emit('error', new HeraldError('closed', `server closed the connection: ${code} ${reason}`));
      this.close();
      return;
    }
    if (isTerminal(code)) {
      const e = new HeraldError('disconnected', `disconnected by the server: ${code} ${reason}`) as HeraldError & {
        closeCode?: number;
      };
      e.closeCode = code;
      this.emit('error', e as Error);
      this.close();
      return;
    }
    // Drains (1001/1012) reconnect at once to another node; token expiry asks for a
    // new token first (connect() always does); everything else backs off.
    if (code === 1012 || code === 1001) this.attempt = 0;
    if (POLICY_CLOSE.has(code)) this.attempt = Math.max(this.attempt, 16);
    this.scheduleReconnect(code === 1012 || code === TOKEN_EXPIRED);
  }

  private scheduleReconnect(soon = false): void {
    if (this.state === 'closed') return;
    clearTimeout(this.reconnectTimer);
    const bound = Math.min(
      this.opts.maxReconnectDelay,
      this.opts.minReconnectDelay * 2 ** Math.min(this.attempt, 16),
    );
    this.attempt++;
    const delay = soon ? Math.random() * this.opts.minReconnectDelay : Math.random() * bound;
    this.reconnectTimer = setTimeout(() => this.dial(), delay);
  }

  private reconnectNow(): void {
    if (this.state === 'connected' || this.state === 'closed') return;
    this.attempt = 0;
    clearTimeout(this.reconnectTimer);
    this.dial();
  }

  /** Drops the current connection and reconnects (dead peer, offline, transport). */
  private drop(why: string): void {
    if (this.state === 'closed' || (!this.ws && !this.sse)) return;
    this.teardown(4000, why);
    this.onClosed(1006, why);
  }

  private teardown(code: number, reason = ''): void {
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

  private onFrame(text: string): void {
    this.lastHeard = Date.now();
    this.pingSent = 0;
    let f: any;
    try {
      f = JSON.parse(text);
    } catch {
      return;
    }
    switch (f.op) {
      case 'welcome':
        return this.onWelcome(f);
      case 'message':
        if (f.base64 !== undefined) return this.onMessage(f.channel, base64(f.base64), f.offset, f.epoch);
        return this.onText(text, f);
      case 'subscribed':
        return this.onSubscribed(f);
      case 'epoch': {
        // Before a binary delivery at offset 1: the epoch it begins.
        const sub = this.subscriptions.get(f.channel);
        if (sub && isStart(sub.offset, sub.epoch)) sub.epoch = f.epoch;
        return;
      }
      case 'reset': {
        const sub = this.subscriptions.get(f.channel);
        if (!sub) return;
        sub.offset = f.offset;
        sub.epoch = f.epoch;
        sub._emit('reset', f);
        sub._emit('recovered', false);
        return;
      }
      case 'unsubscribed':
        // Without an id: the backend unsubscribed us (control API); not asked again.
        if (f.id === undefined) {
          const sub = this.subscriptions.get(f.channel);
          if (!sub) return;
          this.subscriptions.delete(f.channel);
          sub.active = false;
          sub._emit('unsubscribed', f);
          return;
        }
        return this.settle(f.id, f);
      case 'published':
      case 'refreshed':
      case 'pong':
      case 'presence':
      case 'presence_stats':
      case 'history':
      case 'result':
        return this.settle(f.id, f);
      case 'join':
      case 'leave': {
        const { op, channel, ...member } = f;
        this.subscriptions.get(channel)?._emit(op as 'join' | 'leave', member as Member);
        return;
      }
      case 'error': {
        const err = new HeraldError(f.code, f.message);
        // A backend's refusal of an rpc carries the backend's own code.
        if (f.hook_code !== undefined) err.hookCode = f.hook_code;
        if (f.id !== undefined && this.pending.has(f.id)) return this.settle(f.id, undefined, err);
        if (f.channel) this.subscriptions.get(f.channel)?._emit('error', err);
        this.emit('error', err);
        return;
      }
    }
  }

  private onWelcome(f: any): void {
    this.heartbeatMs = f.heartbeat_ms || 25000;
    this.attempt = 0;
    this.authFailures = 0;
    this.setState('connected');
    this.emit('welcome', f);
    this.startHeartbeat();
    this.scheduleRefresh();
    if (this.transport === 'websocket') {
      for (const sub of this.subscriptions.values()) this.sendSubscribe(sub);
    }
    const queued = this.queue;
    this.queue = [];
    for (const q of queued) this.sendPublish(q);
  }

  private onSubscribed(f: any): void {
    let sub = this.subscriptions.get(f.channel);
    if (!sub) {
      // Without an id: the backend subscribed us (control API). It becomes one of ours
      // (resumed after a reconnect like any other); `subscription` hands it over
      // before its first message.
      if (f.id !== undefined) return;
      sub = new Subscription(f.channel, this);
      this.subscriptions.set(f.channel, sub);
      this.emit('subscription', sub);
    }
    if (f.id !== undefined) this.pending.delete(f.id);
    sub.active = true;
    sub._retries = 0;
    // Every subscribe starts whole: no delta applies to what came before.
    sub.delta = f.delta === 'fossil';
    sub._base = undefined;
    // The position moves only with delivered messages: a resumed subscription's replay
    // follows this reply, and a connection lost during it must resume from what
    // arrived, not from the top (which would lose the rest of the replay).
    // A subscription at a start (made before the channel had any publication) resumes
    // into the epoch begun since, when the server can tell none was lost; the replay's
    // first message names it.
    const atStart = isStart(sub.offset, sub.epoch);
    const resumed = f.recovered === true && (sub.epoch === f.epoch || atStart);
    if (f.offset !== undefined && !resumed) {
      const ahead = sub.epoch === f.epoch && sub.offset !== undefined && sub.offset > f.offset;
      if (!ahead) sub.offset = f.offset;
      sub.epoch = f.epoch;
    }
    sub._emit('subscribed', f);
    if (f.recovered !== undefined) sub._emit('recovered', f.recovered);
  }

  /** A text delivery, whole or a delta. A delta that does not apply to the data held
   * (it never should) drops the connection: the resume after it starts whole, from the
   * last delivered offset, so nothing is lost. */
  private onText(text: string, f: any): void {
    const sub = this.subscriptions.get(f.channel);
    if (!sub) return;
    if (f.delta === undefined) {
      // The base of the next delta: the publisher's bytes, as they are in the frame.
      if (sub.delta && f.offset !== undefined) {
        const raw = rawData(text, f.channel);
        sub._base = raw === undefined ? undefined : { offset: f.offset, text: raw };
      }
      return this.onMessage(f.channel, f.data, f.offset, f.epoch);
    }
    // A delta before this subscription's `subscribed` belongs to an earlier one
    // (unsubscribed and subscribed again with frames still on their way).
    if (!sub.active) return;
    const base = sub._base;
    let data: unknown;
    try {
      if (!base || base.offset + 1 !== f.offset) throw new Error('no base for it');
      const whole = applyStringDelta(base.text, f.delta);
      data = JSON.parse(whole);
      sub._base = { offset: f.offset, text: whole };
    } catch (e) {
      sub._base = undefined;
      sub._noDelta = true;
      this.emit('error', new HeraldError('delta', `a delta on ${f.channel} at ${f.offset} did not apply: ${e}`));
      return this.drop('delta');
    }
    this.onMessage(f.channel, data, f.offset, f.epoch);
  }

  private onMessage(channel: string, data: unknown, offset?: number, epoch?: string): void {
    const sub = this.subscriptions.get(channel);
    if (!sub) return;
    if (offset !== undefined) sub.offset = offset;
    // Offset 1 names its epoch (how a subscription at the start learns it).
    if (epoch !== undefined) sub.epoch = epoch;
    sub._emit('message', data, offset === undefined ? { channel } : { channel, offset });
  }

  private onBinary(b: Uint8Array): void {
    this.lastHeard = Date.now();
    this.pingSent = 0;
    let offset: number | undefined;
    let i = 0;
    if (b[0] === 0) {
      offset = Number(new DataView(b.buffer, b.byteOffset + 1, 8).getBigUint64(0));
      i = 9;
    }
    const len = b[i];
    const channel = new TextDecoder().decode(b.subarray(i + 1, i + 1 + len));
    // (Deltas are between text deliveries only: after a binary one the server sends
    // whole, which sets the next base.)
    this.onMessage(channel, b.subarray(i + 1 + len), offset);
  }

  private settle(id: number | undefined, value: unknown, err?: Error): void {
    if (id === undefined) return;
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    clearTimeout(p.timer);
    if (err) p.reject(err);
    else p.resolve(value);
  }

  private fail(p: Pending, err: Error): void {
    clearTimeout(p.timer);
    p.reject(err);
  }

  private send(frame: object): boolean {
    if (!this.ws || this.ws.readyState !== 1) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  private sendSubscribe(sub: Subscription): void {
    const ask = this.opts.getSubscriptionToken;
    if (!ask) return this.sendSubscribeFrame(sub, null);
    Promise.resolve()
      .then(() => ask(sub.channel))
      .then(
        (token) => {
          // Still wanted, on a connection that has not confirmed it yet.
          if (this.state === 'connected' && this.subscriptions.get(sub.channel) === sub && !sub.active) {
            this.sendSubscribeFrame(sub, token ?? null);
          }
        },
        (e) => sub._emit('error', new HeraldError('token', `getSubscriptionToken failed: ${e}`)),
      );
  }

  private sendSubscribeFrame(sub: Subscription, token: string | null): void {
    const id = this.nextId++;
    // A refused subscribe is an error frame with this id: the subscription hears it.
    // `unavailable` (the broker could not confirm it yet, e.g. Redis is down) is
    // retried with backoff while connected, as PROTOCOL.md asks.
    this.pending.set(id, {
      resolve: () => {},
      reject: (e) => {
        sub._emit('error', e as HeraldError);
        if ((e as HeraldError).code !== 'unavailable') return;
        const bound = Math.min(this.opts.maxReconnectDelay, this.opts.minReconnectDelay * 2 ** sub._retries++);
        setTimeout(() => {
          if (this.state === 'connected' && this.subscriptions.get(sub.channel) === sub && !sub.active) {
            this.sendSubscribe(sub);
          }
        }, Math.random() * bound);
      },
    });
    const frame: any = { op: 'subscribe', channel: sub.channel, id, recover: true };
    if (sub.offset !== undefined && sub.epoch) frame.since = { offset: sub.offset, epoch: sub.epoch };
    if (token) frame.token = token;
    if (sub.options.delta && !sub._noDelta) frame.delta = sub.options.delta;
    this.send(frame);
  }

  private sendPublish(q: Queued): void {
    if (this.transport === 'sse') {
      this.httpPublish(q);
      return;
    }
    const id = this.nextId++;
    this.pending.set(id, q.pending);
    if (!this.send({ op: 'publish', channel: q.channel, data: q.data, id })) {
      this.pending.delete(id);
      this.queue.push(q);
    }
  }

  /** Calls the application's backend (the server's `[hooks.rpc]`): resolves with its
   * result. Rejects with `refused` (the backend said no; its code in `hookCode`),
   * `unavailable` (it did not answer), `forbidden`, `rate_limited`, or `disconnected`
   * (the connection dropped first: whether the backend ran it is unknown). */
  rpc(method: string, data: unknown = null): Promise<unknown> {
    return this._query({ op: 'rpc', method, data }).then((f) => f.data);
  }

  /** @internal A question answered by a frame with its id (presence, presence_stats). */
  _query(frame: Record<string, unknown>): Promise<any> {
    return new Promise((resolve, reject) => {
      if (this.state !== 'connected' || this.transport !== 'websocket') {
        return reject(new HeraldError('disconnected', 'not connected over WebSocket'));
      }
      const id = this.nextId++;
      const p: Pending = { resolve, reject, query: true };
      p.timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new HeraldError('timeout', `${String(frame.op)} timed out`));
      }, this.opts.publishTimeout);
      this.pending.set(id, p);
      this.send({ ...frame, id });
    });
  }

  /** @internal */
  _unsubscribe(sub: Subscription): void {
    if (this.subscriptions.get(sub.channel) !== sub) return;
    this.subscriptions.delete(sub.channel);
    sub.active = false;
    if (this.transport === 'websocket') this.send({ op: 'unsubscribe', channel: sub.channel, id: this.nextId++ });
    else if (this.state === 'connected') this.restartSse();
  }

  // ---- liveness and tokens ----

  private startHeartbeat(): void {
    clearInterval(this.heartbeatTimer);
    this.lastHeard = Date.now();
    this.pingSent = 0;
    // Browsers answer the server's pings without telling the page, so ask ourselves:
    // after a heartbeat interval of silence send a ping; without an answer within
    // half an interval more (at least 5 s), the connection is dead.
    const margin = Math.max(this.heartbeatMs / 2, 5000);
    const tick = Math.max(Math.min(this.heartbeatMs, margin) / 4, 50);
    this.heartbeatTimer = setInterval(() => {
      const now = Date.now();
      if (this.pingSent && now - this.pingSent > margin) return this.drop('heartbeat timeout');
      if (!this.pingSent && now - this.lastHeard > this.heartbeatMs + (this.transport === 'sse' ? margin : 0)) {
        if (this.transport === 'sse') return this.drop('heartbeat timeout');
        this.pingSent = now;
        this.send({ op: 'ping' });
      }
    }, tick);
  }

  private scheduleRefresh(): void {
    clearTimeout(this.refreshTimer);
    const claims = this.token ? tokenClaims(this.token) : undefined;
    if (!claims?.exp || !this.opts.getToken || this.transport !== 'websocket') return;
    // The token's lifetime by the issuer's clock (exp - iat) counted from when it was
    // received, not exp against this machine's clock, which may be minutes off (a
    // clock 850 s fast made every 15-minute token look expired: a refresh storm).
    // Without iat, the local clock is all there is.
    const lifetime = claims.iat ? (claims.exp - claims.iat) * 1000 : claims.exp * 1000 - this.tokenAt;
    // Refresh at 80% of the lifetime, or a minute before expiry if that is later.
    const due = this.tokenAt + Math.max(lifetime * 0.8, lifetime - 60000);
    // Never closer than 5 s to the previous refresh, whatever the token says.
    const at = Math.max(due, this.lastRefresh + 5000) - Date.now();
    this.refreshTimer = setTimeout(async () => {
      try {
        this.lastRefresh = Date.now();
        const t = await this.opts.getToken!();
        if (!t || this.state !== 'connected') return;
        this.token = t;
        this.tokenAt = Date.now();
        const id = this.nextId++;
        this.pending.set(id, {
          resolve: () => this.scheduleRefresh(),
          reject: (e) => this.emit('error', e as Error),
        });
        this.send({ op: 'refresh', token: t, id });
      } catch (e) {
        this.emit('error', e as Error);
      }
    }, at);
  }

  // ---- Server-Sent Events ----

  private sseBase(): string {
    if (this.opts.sseUrl) return this.opts.sseUrl;
    const u = new URL(this.url);
    u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
    u.pathname = u.pathname.replace(/\/ws$/, '') + '/sse';
    u.search = '';
    return u.toString();
  }

  private restartSse(): void {
    this.sse?.abort();
    this.sse = null;
    this.dial();
  }

  private async openSse(): Promise<void> {
    const channels = [...this.subscriptions.keys()];
    if (channels.length === 0) {
      // Nothing to stream yet: connected as far as publishing goes.
      this.opened = true;
      this.onWelcome({ op: 'welcome', heartbeat_ms: 2 ** 30 });
      return;
    }
    const u = new URL(this.sseBase());
    for (const c of channels) u.searchParams.append('channel', c);
    const positions = [...this.subscriptions.values()]
      .filter((s) => s.offset !== undefined && s.epoch)
      .map((s) => `${s.channel}=${s.offset}~${s.epoch}`);
    if (positions.length) u.searchParams.set('last_event_id', positions.join(','));
    // One stream for every channel: deltas where any subscription asked for them (each
    // `subscribed` says where they come; the client applies them wherever they do), and
    // none once one failed (the stream cannot leave that one out).
    const subs = [...this.subscriptions.values()];
    if (subs.some((s) => s.options.delta) && !subs.some((s) => s._noDelta)) u.searchParams.set('delta', 'fossil');
    const abort = new AbortController();
    this.sse = abort;
    const headers: Record<string, string> = { accept: 'text/event-stream' };
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    try {
      const r = await fetch(u, { headers, signal: abort.signal, cache: 'no-store', credentials: this.credentials() });
      if (!r.ok || !r.body) {
        const body: any = await r.json().catch(() => ({}));
        const err = new HeraldError(body.code ?? 'sse', body.message ?? `SSE refused: ${r.status}`);
        if (r.status === 401 || r.status === 403) {
          this.authFailures++;
          const max = this.opts.maxAuthFailures;
          if (max > 0 && this.authFailures >= max) {
            // The credentials will not do: stop, and say why (the application signs
            // the user in again, then makes a new client).
            this.sse = null;
            this.emit('error', err);
            this.close();
            return;
          }
        }
        throw err;
      }
      this.opened = true;
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = '';
      let closeCode = 1006;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let end;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          this.lastHeard = Date.now();
          let event = 'message';
          const data: string[] = [];
          for (const line of block.split('\n')) {
            if (line.startsWith('data: ')) data.push(line.slice(6));
            else if (line.startsWith('event: ')) event = line.slice(7);
          }
          if (!data.length) continue;
          if (event === 'close') closeCode = JSON.parse(data.join('\n')).code;
          else this.onFrame(data.join('\n'));
        }
      }
      if (this.sse === abort) {
        this.sse = null;
        this.onClosed(closeCode, 'stream ended');
      }
    } catch (e) {
      if (this.sse !== abort) return; // replaced or closed on purpose
      this.sse = null;
      this.emit('error', e as Error);
      if (!this.opened) {
        // SSE failed too: the server, not WebSocket, is unreachable. Alternate, so
        // that the first attempt once it is back may be a WebSocket again.
        this.transport = 'websocket';
        this.wsFailures = 0;
        this.emit('transport', 'websocket');
      }
      this.onClosed(1006, 'stream failed');
    }
  }

  private credentials(): RequestCredentials {
    return this.opts.withCredentials ? 'include' : 'same-origin';
  }

  private async httpPublish(q: Queued): Promise<void> {
    const u = new URL(this.sseBase());
    u.pathname = u.pathname + '/publish';
    const headers: Record<string, string> = { 'content-type': 'application/json' };
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    try {
      const r = await fetch(u, {
        method: 'POST',
        headers,
        body: JSON.stringify({ channel: q.channel, data: q.data }),
        credentials: this.credentials(),
      });
      const body: any = await r.json().catch(() => ({}));
      clearTimeout(q.pending.timer);
      if (r.ok) q.pending.resolve(body);
      else q.pending.reject(new HeraldError(body.code ?? 'http', body.message ?? `HTTP ${r.status}`));
    } catch (e) {
      this.fail(q.pending, e as Error);
    }
  }
}

function withParam(url: string, k: string, v: string): string {
  return url + (url.includes('?') ? '&' : '?') + `${k}=${encodeURIComponent(v)}`;
}

/** A JWT's `exp` and `iat`, without verifying them (the server does). */
function tokenClaims(token: string): { exp?: number; iat?: number } | undefined {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(part));
  } catch {
    return undefined;
  }
}

/** The publisher's JSON text inside a whole `message` frame of a history channel:
 * between `"data":` and the last `,"offset":` (PROTOCOL.md, "Deltas"). */
function rawData(frame: string, channel: string): string | undefined {
  const head = `{"op":"message","channel":"${channel}","data":`;
  const end = frame.lastIndexOf(',"offset":');
  return frame.startsWith(head) && end >= head.length ? frame.slice(head.length, end) : undefined;
}

function base64(s: string): Uint8Array {
  return Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
}
