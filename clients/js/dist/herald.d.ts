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
declare class Emitter<E extends {
    [K in keyof E]: Listener;
}> {
    private listeners;
    on<K extends keyof E>(event: K, fn: E[K]): this;
    off<K extends keyof E>(event: K, fn: E[K]): this;
    protected emit<K extends keyof E>(event: K, ...args: Parameters<E[K]>): void;
}
export declare class HeraldError extends Error {
    code: string;
    /** For `refused` (a hook's error answer): the application backend's own code. */
    hookCode?: number;
    constructor(code: string, message: string);
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
export declare class Subscription extends Emitter<SubscriptionEvents> {
    readonly channel: string;
    private client;
    /** What was asked for (see SubscribeOptions). */
    readonly options: SubscribeOptions;
    /** The last position seen, on history channels. */
    offset?: number;
    epoch?: string;
    active: boolean;
    /** The server sends deltas on this subscription (its `subscribed` said so). */
    delta: boolean;
    /** @internal Subscribes answered `unavailable` in a row (retried with backoff). */
    _retries: number;
    /** @internal With deltas: the last positioned text delivery's offset and raw JSON
     * text, which the next delta applies to. */
    _base?: {
        offset: number;
        text: string;
    };
    /** @internal A delta did not apply here: deltas are no longer asked for on this
     * subscription, so whatever made it fail cannot make the client reconnect again and
     * again. */
    _noDelta: boolean;
    constructor(channel: string, client: Client, 
    /** What was asked for (see SubscribeOptions). */
    options?: SubscribeOptions);
    /** Stops receiving the channel. */
    unsubscribe(): void;
    /** One page of who is present (channels with presence; subscribers only by default).
     * Pass the returned `cursor` back for the next page; it is absent on the last. */
    presence(cursor?: string): Promise<{
        members: Member[];
        cursor?: string;
    }>;
    /** How many connections and distinct users are present. */
    presenceStats(): Promise<{
        connections: number;
        users: number;
    }>;
    /** The channel's last `limit` publications (history channels; subscribers by
     * default), oldest first, for a page to show before live messages. It moves
     * nothing: resuming stays the client's job. */
    history(opts?: {
        limit?: number;
    }): Promise<{
        epoch: string;
        offset: number;
        publications: {
            offset: number;
            data?: unknown;
            binary?: string;
        }[];
    }>;
    /** @internal */
    _emit<K extends keyof SubscriptionEvents>(event: K, ...args: Parameters<SubscriptionEvents[K]>): void;
}
/** A Herald connection. Events: `state` (State), `welcome` (frame), `error`,
 * `subscription` (a Subscription the server made: control API). */
export declare class Client extends Emitter<ClientEvents> {
    readonly url: string;
    state: State;
    transport: Transport;
    readonly subscriptions: Map<string, Subscription>;
    private opts;
    private ws;
    private sse;
    private nextId;
    private started;
    private pending;
    private queue;
    private attempt;
    private wsFailures;
    private reconnectTimer?;
    private heartbeatTimer?;
    private refreshTimer?;
    private wsRetryTimer?;
    private lastHeard;
    private pingSent;
    private heartbeatMs;
    private token;
    private opened;
    /** Credentials refused in a row (see `maxAuthFailures`). */
    private authFailures;
    /** When the token in use was received (local clock), for refresh scheduling. */
    private tokenAt;
    /** When the last refresh was sent, so refreshes never come closer than a floor. */
    private lastRefresh;
    private onOnline;
    private onOffline;
    constructor(url: string, options?: Options);
    /** Starts connecting (with `autoConnect: false`; otherwise the constructor did).
     * Once: after `close()`, make a new client. */
    connect(): void;
    /** Subscribes (or returns the existing subscription). History channels resume by
     * themselves after every reconnect. */
    subscribe(channel: string, options?: SubscribeOptions): Subscription;
    /** Publishes JSON `data`; resolves once the server accepted it. While disconnected
     * the publish waits (at most `maxQueuedPublishes`, each `publishTimeout` ms). */
    publish(channel: string, data: unknown): Promise<unknown>;
    /** Closes for good: no reconnect. */
    close(): void;
    /** The connection is gone: whatever it carried will not be answered. Publishes sent
     * on it fail with `unknown_outcome` (the server may have taken them); subscribes and
     * refreshes are forgotten, not failed: the next welcome sends them again, and a
     * subscription must not hear an error for a request nobody refused. */
    private abandonRequests;
    private setState;
    private dial;
    private onWsFailure;
    private onClosed;
    private scheduleReconnect;
    private reconnectNow;
    /** Drops the current connection and reconnects (dead peer, offline, transport). */
    private drop;
    private teardown;
    private onFrame;
    private onWelcome;
    private onSubscribed;
    /** A text delivery, whole or a delta. A delta that does not apply to the data held
     * (it never should) drops the connection: the resume after it starts whole, from the
     * last delivered offset, so nothing is lost. */
    private onText;
    private onMessage;
    private onBinary;
    private settle;
    private fail;
    private send;
    private sendSubscribe;
    private sendSubscribeFrame;
    private sendPublish;
    /** Calls the application's backend (the server's `[hooks.rpc]`): resolves with its
     * result. Rejects with `refused` (the backend said no; its code in `hookCode`),
     * `unavailable` (it did not answer), `forbidden`, `rate_limited`, or `disconnected`
     * (the connection dropped first: whether the backend ran it is unknown). */
    rpc(method: string, data?: unknown): Promise<unknown>;
    /** @internal A question answered by a frame with its id (presence, presence_stats). */
    _query(frame: Record<string, unknown>): Promise<any>;
    /** @internal */
    _unsubscribe(sub: Subscription): void;
    private startHeartbeat;
    private scheduleRefresh;
    private sseBase;
    private restartSse;
    private openSse;
    private credentials;
    private httpPublish;
}
export {};
