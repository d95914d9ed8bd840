// One viewer's life on the watch page: viewer token → (subscribe-only Stage) → heartbeats, and
// recovery with a new token and a new Stage when anything ends it. No DOM here; the page renders
// the snapshot passed to onUpdate and puts `tracks` on its <video>.
//
// States: connecting · no-show (room not created yet) · full (503) · joining · waiting (joined, the
// broadcaster is not publishing) · playing · overflow (past the real-time ceiling: the page plays
// `playbackUrl`, the room's low-latency channel; the lease and heartbeats go on as on a Stage) ·
// reconnecting · stopped · error (nothing to retry, e.g. an
// invalid room, or a ticket for another room) · ticket (the gateway wants a ticket this page lacks or
// refused the one it had; the host app was asked for a new one, and its arrival starts again).
//
// With a host app's ticket (FANOUT_VIEWER_AUTH=jwt) the token request carries it and leaves out the
// userId (the ticket names the viewer) and, unless the page asks for one, the room. A lease outlives
// its ticket: heartbeats need none, so a new ticket is only needed when the page must get back in.

import { getViewerToken, leaveOnUnload, sendHeartbeat } from './api.js';
import { describeStageError, stageErrorName } from './sdk.js';
import { isTicketRefusal } from './ticket.js';

const MAX_BACKOFF_SECONDS = 30;
const NO_SHOW_MAX_SECONDS = 10;

// Stage errors after which this Stage is of no further use.
const RECOVERABLE_ERRORS = new Set([
  'TOKEN_EXPIRED',
  'TOKEN_MALFORMED',
  'TIMEOUT',
  'FAILED',
  'STAGE_AT_CAPACITY',
  'STAGE_DELETED',
  'PARTICIPANT_DISCONNECTED',
  // Refused after a signing-key rotation or an emulator restart: a fresh token gets back in.
  'TOKEN_NOT_ALLOWED',
]);

export function backoffSeconds(attempt, cap = MAX_BACKOFF_SECONDS) {
  const base = Math.min(cap, 2 ** attempt);
  return base / 2 + Math.random() * (base / 2);
}

function isBroadcaster(info) {
  if (info.isLocal) return false;
  return (info.attributes && info.attributes.role === 'publisher') || info.isPublishing === true;
}

export class ViewerSession {
  /**
   * @param {object} options
   * @param {object} options.sdk  SDK namespace from loadStageSdk()
   * @param {string|null} options.room  the room asked for; null: the gateway's default or the ticket's
   * @param {string} options.shownRoom  the room to show until the gateway answers
   * @param {string|null} options.userId  sticky id from an earlier visit, if any (not sent with a ticket)
   * @param {number} options.heartbeatSeconds
   * @param {import('./ticket.js').TicketHolder|null} [options.tickets]  the host app's tickets, if any
   * @param {(snapshot: object) => void} options.onUpdate  state, ids, message or tracks changed
   */
  constructor({ sdk, room, shownRoom, userId, heartbeatSeconds, tickets = null, onUpdate }) {
    this.sdk = sdk;
    this.onUpdate = onUpdate;
    this.heartbeatMs = Math.max(1, heartbeatSeconds) * 1000;
    this.requestedRoom = room;
    this.tickets = tickets;
    if (tickets) tickets.onTicket(() => this.ticketArrived());
    this.snapshot = {
      state: 'stopped',
      room: room || shownRoom,
      userId,
      stageArn: null,
      participantId: null,
      tier: null,
      playbackUrl: null,
      message: '',
      retryAt: null,
    };
    this.generation = 0; // bumps on every (re)connect; callbacks from older generations are ignored
    this.attempt = 0;
    this.stage = null;
    this.heartbeatTimer = null;
    this.retryTimer = null;
    this.tracksByParticipant = new Map();
  }

  get tracks() {
    return [...this.tracksByParticipant.values()].flat();
  }

  update(changes) {
    Object.assign(this.snapshot, changes);
    this.onUpdate({ ...this.snapshot });
  }

  start() {
    this.attempt = 0;
    this.connect();
  }

  /** Ends everything; with `unloading`, also ends the lease with a beacon. */
  stop({ unloading = false } = {}) {
    this.generation += 1;
    this.teardown();
    if (unloading && this.snapshot.userId) {
      leaveOnUnload(this.snapshot.room, this.snapshot.userId);
    }
    this.update({ state: 'stopped', retryAt: null });
  }

  async connect() {
    const generation = ++this.generation;
    this.teardown();
    this.update({ state: 'connecting', message: 'Getting a viewer token…', retryAt: null });

    const ticket = this.tickets ? this.tickets.current : null;
    let answer;
    try {
      answer = await getViewerToken({
        room: this.requestedRoom || undefined,
        userId: ticket ? undefined : this.snapshot.userId || undefined,
        ticket: ticket || undefined,
      });
    } catch (error) {
      if (generation === this.generation) this.onTokenError(error, ticket);
      return;
    }
    if (generation !== this.generation) return;

    if (answer.tier === 'overflow') {
      // Past the real-time ceiling: no Stage, the room's channel a few seconds behind.
      this.attempt = 0;
      this.update({
        room: answer.room,
        userId: answer.userId,
        stageArn: null,
        participantId: null,
        tier: 'overflow',
        playbackUrl: answer.playbackUrl,
        state: 'overflow',
        message: 'The real-time seats are full: watching the stream a few seconds behind.',
      });
      this.startHeartbeat(generation);
      return;
    }
    this.update({
      room: answer.room,
      userId: answer.userId,
      stageArn: answer.stageArn,
      participantId: answer.participantId,
      tier: 'realtime',
      playbackUrl: null,
    });
    this.startHeartbeat(generation);
    this.join(generation, answer.token);
  }

  onTokenError(error, ticket) {
    if (isTicketRefusal(error) && this.tickets && this.tickets.current !== ticket) {
      this.connect(); // a new ticket came while the refused one was on its way
    } else if (isTicketRefusal(error)) {
      this.needTicket(error.code);
    } else if (error.status === 403) {
      // A valid ticket for another room or viewer: retrying cannot help, a different ticket can.
      this.update({ state: 'error', message: `Cannot watch: ${error.message}` });
    } else if (error.status === 404) {
      const delay = backoffSeconds(this.attempt++, NO_SHOW_MAX_SECONDS);
      this.retryIn(delay, 'no-show', 'The show has not started yet. Waiting for the broadcaster…');
    } else if (error.status === 503 || error.status === 429) {
      const delay = error.retryAfterSeconds ?? backoffSeconds(this.attempt++);
      this.retryIn(delay, 'full', 'The show is full right now. Trying again shortly…');
    } else if (error.status === 400) {
      this.update({ state: 'error', message: `Cannot watch: ${error.message}` });
    } else {
      this.recover(`Could not get a viewer token: ${error.message}`);
    }
  }

  /** Stops until a ticket arrives, and asks the embedding host app for one. */
  needTicket(code) {
    this.generation += 1;
    this.teardown();
    const asked = this.tickets !== null && this.tickets.requestNew(code);
    let message;
    if (code === 'ticket_required') {
      message = asked
        ? 'A ticket is required to watch this show. Asking the host app for one…'
        : 'A ticket is required to watch this show. Open this page from the host app, whose link carries it.';
    } else {
      message = asked
        ? 'Your ticket has expired or is not valid. Asking the host app for a new one…'
        : 'Your ticket has expired or is not valid. Open this page again from the host app.';
    }
    this.update({ state: 'ticket', message, retryAt: null });
  }

  ticketArrived() {
    // Worth a try only when a ticket (or its absence, or a ticket for something else) stopped the session.
    if (this.snapshot.state === 'ticket' || this.snapshot.state === 'error') this.start();
  }

  /** Drops the Stage and tries again with a new token after a backoff. */
  recover(reason) {
    console.info(`viewer: recovering (${reason})`);
    this.generation += 1;
    this.teardown();
    this.retryIn(backoffSeconds(this.attempt++), 'reconnecting', `${reason}. Reconnecting…`);
  }

  retryIn(seconds, state, message) {
    clearTimeout(this.retryTimer);
    const generation = this.generation;
    this.retryTimer = setTimeout(() => {
      if (generation === this.generation) this.connect();
    }, seconds * 1000);
    this.update({ state, message, retryAt: Date.now() + seconds * 1000 });
  }

  startHeartbeat(generation) {
    clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = setInterval(async () => {
      try {
        const answer = await sendHeartbeat(this.snapshot.room, this.snapshot.userId);
        // In the overflow tier: a Stage seat freed up, so a new token takes the viewer back to real
        // time (the allocator tries a Stage first; if someone took the seat, the overflow seat stays).
        if (generation === this.generation && this.snapshot.tier === 'overflow' && answer && answer.realtimeAvailable) {
          this.connect();
        }
      } catch (error) {
        if (generation !== this.generation) return;
        // 404: the lease is gone (reaped or the Stage was removed); anything else is a blip.
        if (error.status === 404) this.recover('The viewer lease expired');
        else console.warn(`viewer: heartbeat failed (${error.code})`);
      }
    }, this.heartbeatMs);
  }

  join(generation, token) {
    const { Stage, SubscribeType, StageEvents } = this.sdk;
    const strategy = {
      stageStreamsToPublish: () => [],
      shouldPublishParticipant: () => false,
      shouldSubscribeToParticipant: (info) => (isBroadcaster(info) ? SubscribeType.AUDIO_VIDEO : SubscribeType.NONE),
    };
    const current = () => generation === this.generation;
    let stage;
    try {
      stage = new Stage(token, strategy); // throws at once on a malformed token
    } catch (error) {
      this.recover(`Could not join: ${describeStageError(this.sdk, error)}`);
      return;
    }
    this.stage = stage;

    stage.on(StageEvents.STAGE_PARTICIPANT_STREAMS_ADDED, (info, streams) => {
      if (!current() || info.isLocal) return;
      const tracks = this.tracksByParticipant.get(info.id) || [];
      for (const stream of streams) {
        const track = stream.mediaStreamTrack;
        if (track && (track.kind === 'video' || track.kind === 'audio') && !tracks.includes(track)) tracks.push(track);
      }
      this.tracksByParticipant.set(info.id, tracks);
      this.tracksChanged();
    });
    stage.on(StageEvents.STAGE_PARTICIPANT_STREAMS_REMOVED, (info, streams) => {
      if (!current()) return;
      const gone = new Set(streams.map((s) => s.mediaStreamTrack));
      const tracks = (this.tracksByParticipant.get(info.id) || []).filter((t) => !gone.has(t));
      if (tracks.length) this.tracksByParticipant.set(info.id, tracks);
      else this.tracksByParticipant.delete(info.id);
      this.tracksChanged();
    });
    stage.on(StageEvents.STAGE_PARTICIPANT_LEFT, (info) => {
      if (!current() || !this.tracksByParticipant.delete(info.id)) return;
      this.tracksChanged();
    });
    // A participant without the publisher attribute counts once it publishes: ask the strategy again.
    stage.on(StageEvents.STAGE_PARTICIPANT_PUBLISH_STATE_CHANGED, (info) => {
      if (current() && !info.isLocal) stage.refreshStrategy();
    });
    stage.on(StageEvents.STAGE_CONNECTION_STATE_CHANGED, (state) => {
      if (!current()) return;
      if (state === 'disconnected' || state === 'errored') {
        this.update({ message: 'Connection lost; retrying…' });
      } else if (state === 'connected') {
        this.tracksChanged();
      }
    });
    stage.on(StageEvents.ERROR, (error) => {
      if (!current()) return;
      const text = describeStageError(this.sdk, error);
      const name = stageErrorName(this.sdk, error && error.code);
      console.warn(`viewer: stage error ${text}`);
      if (RECOVERABLE_ERRORS.has(name)) this.recover(`Stage error ${name}`);
      else this.update({ message: `Stage error: ${text}` });
    });
    stage.on(StageEvents.STAGE_LEFT, (reason) => {
      if (current()) this.recover(`Left the Stage (${reason})`);
    });

    this.update({ state: 'joining', message: 'Joining the Stage…' });
    stage
      .join()
      .then(() => {
        if (!current()) return;
        this.attempt = 0;
        this.tracksChanged();
      })
      .catch((error) => {
        if (current()) this.recover(`Could not join: ${describeStageError(this.sdk, error)}`);
      });
  }

  tracksChanged() {
    const hasVideo = this.tracks.some((t) => t.kind === 'video');
    if (hasVideo) this.update({ state: 'playing', message: '' });
    else this.update({ state: 'waiting', message: 'Connected. Waiting for the broadcaster to go live…' });
  }

  teardown() {
    clearInterval(this.heartbeatTimer);
    clearTimeout(this.retryTimer);
    this.heartbeatTimer = null;
    this.retryTimer = null;
    if (this.stage) {
      this.stage.removeAllListeners();
      this.stage.leave();
      this.stage = null;
    }
    if (this.tracksByParticipant.size) {
      this.tracksByParticipant.clear();
      this.onUpdate({ ...this.snapshot });
    }
  }
}
