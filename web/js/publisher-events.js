// Follows GET /api/rooms/{room}/publisher/events (DESIGN.md §5, §7) for the broadcast page: a
// `snapshot` of every Stage with a fresh publish token, then `stage-added` / `stage-removed`, and
// `room-ended`. It reconnects with backoff when the stream ends, fails or says `unavailable`; every
// reconnect starts with a new snapshot, so nothing missed in between is lost. No DOM here.
// Each connection carries the current credential (`bearer()`): a refused host app's ticket is
// replaced through `renewed`, then the stream reconnects at once.

import { readEventStream, StreamHttpError } from './sse.js';
import { isTicketRefusal } from './ticket.js';

const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 15000];
// The server sends a keep-alive comment every 15 s; three missed ones mean the connection is dead.
const IDLE_TIMEOUT_MS = 45000;
// Answers that retrying cannot fix: the page stops following and says why.
const FATAL_STATUSES = new Set([400, 401, 403, 404]);

function backoff(attempt) {
  const base = BACKOFF_MS[Math.min(attempt, BACKOFF_MS.length - 1)];
  return Math.round(base * (0.8 + Math.random() * 0.4));
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener(
      'abort',
      () => {
        clearTimeout(timer);
        resolve();
      },
      { once: true },
    );
  });
}

export class PublisherEvents {
  /**
   * @param {object} options
   * @param {() => string} options.bearer  the publisher key or ticket, read for every connection
   * @param {(code: string, refused: string, signal: AbortSignal) => Promise<boolean>} [options.renewed]
   *   resolves true once the refused ticket is replaced; without it a refused credential is fatal
   * @param {string} options.room
   * @param {string} [options.userId]
   * @param {(tokens: object[]) => void} options.onSnapshot
   * @param {(token: object) => void} options.onStageAdded
   * @param {(stageArn: string) => void} options.onStageRemoved
   * @param {() => void} options.onRoomEnded  the room was ended; the stream is over for good
   * @param {(error: Error) => void} options.onFatal  the server refused the stream (bad key, ...)
   * @param {(status: object) => void} options.onStatus  connection state changes, see `status`
   */
  constructor({ bearer, renewed, room, userId, onSnapshot, onStageAdded, onStageRemoved, onRoomEnded, onFatal, onStatus }) {
    const query = userId ? `?userId=${encodeURIComponent(userId)}` : '';
    this.url = `/api/rooms/${encodeURIComponent(room)}/publisher/events${query}`;
    this.bearer = bearer;
    this.renewed = renewed || null;
    this.handlers = { onSnapshot, onStageAdded, onStageRemoved, onRoomEnded, onFatal, onStatus };
    this.controller = null;
    // Plain data for the page and tests; never the key or tokens.
    this.status = {
      state: 'idle', // connecting | open | reconnecting | ended | failed | stopped
      reason: null,
      retryInMs: null,
      snapshots: 0,
      added: 0,
      removed: 0,
      reconnects: 0,
      lastDrop: null, // why the stream last ended, kept after it is back
    };
  }

  start() {
    if (this.controller) return;
    this.controller = new AbortController();
    this.run(this.controller.signal);
  }

  stop() {
    if (!this.controller) return;
    this.controller.abort();
    this.controller = null;
    this.setStatus('stopped');
  }

  setStatus(state, extra = {}) {
    Object.assign(this.status, { state, reason: null, retryInMs: null }, extra);
    this.handlers.onStatus({ ...this.status });
  }

  async run(signal) {
    let attempt = 0;
    while (!signal.aborted) {
      this.setStatus(this.status.snapshots === 0 && attempt === 0 ? 'connecting' : 'reconnecting', {
        reason: this.status.reason,
      });
      let reason = 'the server closed the stream';
      let retryAfterMs = null;
      let ended = false;
      const bearer = this.bearer();
      try {
        await readEventStream(this.url, {
          headers: { Authorization: `Bearer ${bearer}` },
          signal,
          idleTimeoutMs: IDLE_TIMEOUT_MS,
          onEvent: (event) => {
            const outcome = this.dispatch(event);
            if (outcome === 'snapshot') attempt = 0; // a healthy stream: the next drop retries fast
            if (outcome === 'ended') ended = true;
            if (outcome && typeof outcome === 'object') reason = outcome.unavailable;
          },
        });
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof StreamHttpError) {
          if (isTicketRefusal(error) && this.renewed) {
            this.setStatus('reconnecting', { reason: 'waiting for a new ticket from the host app' });
            if (await this.renewed(error.code, bearer, signal)) continue; // at once, with the new ticket
            if (signal.aborted) return;
          }
          if (FATAL_STATUSES.has(error.status)) {
            this.controller = null;
            this.setStatus('failed', { reason: error.message });
            this.handlers.onFatal(error);
            return;
          }
          if (error.retryAfterSeconds) retryAfterMs = error.retryAfterSeconds * 1000;
        }
        reason = error.message || String(error);
      }
      if (signal.aborted) return;
      if (ended) {
        this.controller = null;
        this.setStatus('ended');
        this.handlers.onRoomEnded();
        return;
      }
      const delay = retryAfterMs ?? backoff(attempt);
      attempt += 1;
      this.status.reconnects += 1;
      this.setStatus('reconnecting', { reason, retryInMs: delay, lastDrop: reason });
      await sleep(delay, signal);
    }
  }

  /** Returns 'snapshot', 'ended', {unavailable: message} or null. */
  dispatch({ event, data }) {
    let payload;
    try {
      payload = JSON.parse(data);
    } catch {
      console.warn(`publisher events: ignored a ${event} event that is not JSON`);
      return null;
    }
    try {
      return this.handle(event, payload);
    } catch (error) {
      // A bug in a handler must not tear the stream down (the reconnect would hide it): report it.
      console.error(`publisher events: handling ${event} failed: ${error && error.stack ? error.stack : error}`);
      return null;
    }
  }

  handle(event, payload) {
    switch (event) {
      case 'snapshot':
        this.status.snapshots += 1;
        this.setStatus('open');
        this.handlers.onSnapshot(Array.isArray(payload.tokens) ? payload.tokens : []);
        return 'snapshot';
      case 'stage-added':
        this.status.added += 1;
        this.handlers.onStageAdded(payload);
        this.handlers.onStatus({ ...this.status });
        return null;
      case 'stage-removed':
        this.status.removed += 1;
        this.handlers.onStageRemoved(payload.stageArn);
        this.handlers.onStatus({ ...this.status });
        return null;
      case 'room-ended':
        return 'ended';
      case 'unavailable':
        return { unavailable: payload.message || 'the server is unavailable' };
      default:
        return null; // newer servers may send more; unknown events are ignored
    }
  }
}
