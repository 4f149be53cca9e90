// Type-level tests of the client's API, checked by `node build.mjs` (tsc --noEmit): each
// `@ts-expect-error` line must be an error, or the build fails.
import { Client, Member } from '../src/herald';

const c = new Client('ws://127.0.0.1:1/ws', { autoConnect: false, getSubscriptionToken: () => null });
c.on('state', (s) => {
  const known: 'connecting' | 'connected' | 'disconnected' | 'closed' = s;
  void known;
});
c.on('subscription', (sub) => sub.channel.toUpperCase());
// @ts-expect-error: a misspelt event name
c.on('stat', () => {});
const sub = c.subscribe('room:1');
sub.on('join', (m: Member) => m.user.toUpperCase());
sub.on('message', (data, ctx) => ctx.offset);
// @ts-expect-error: `recovered` carries a boolean
sub.on('recovered', (ok: string) => ok);
// @ts-expect-error: subscriptions have no `welcome`
sub.on('welcome', () => {});
void sub.history({ limit: 5 }).then((h) => h.publications.map((p) => p.offset));
void sub.presenceStats().then((s) => s.connections + s.users);
c.connect();
c.close();
