// One go-live of the broadcast page: publish tokens → a StageFanout over the room's Stages → the
// publisher events stream, until Stop, the page going away or the room ending. No DOM here; the page
// renders what the callbacks report and `stages`. The mirror of ViewerSession on the watch page.
//
// Go live asks POST /api/token/publisher-all once (it creates the room and answers a bad key with a
// plain 401), joins those Stages, then follows the publisher events stream while live: a snapshot
// re-syncs the set of Stages (on every reconnect too), stage-added joins a new Stage, stage-removed
// leaves one, room-ended ends the session. So the audience can grow the pool without a reload.
//
// Every call carries `auth.bearer()`: the publisher key, or the host app's publisher ticket. A ticket
// is short-lived; when the gateway refuses it, the session asks the host app for a new one
// (`auth.renewed`) and tries that call again with it, once.

import { getPublisherTokens, reportPublishing } from './api.js';
import { PublisherEvents } from './publisher-events.js';
import { StageFanout } from './stage-fanout.js';
import { isTicketRefusal } from './ticket.js';
import { stageId } from './ui.js';

// How long going live or a status report waits for the host app's new ticket.
const TICKET_WAIT_MS = 15000;

function refusalText(error, isTicket) {
  if (isTicket && isTicketRefusal(error)) {
    return 'The host app\'s ticket expired or is not valid (401), and no new one arrived. Open this page again from the host app.';
  }
  if (isTicket && error.status === 403) return `The host app's ticket does not allow this: ${error.message}`;
  if (error.status === 401) return 'The publisher key was rejected (401). Check it and try again.';
  return `Could not get publish tokens: ${error.message}`;
}

export class BroadcastSession {
  /**
   * @param {object} options
   * @param {object} options.sdk  SDK namespace from loadStageSdk()
   * @param {object} options.auth  what the calls carry: `{ isTicket, bearer(), renewed(code, {signal, timeoutMs}) }`;
   *   `renewed` resolves true once a new ticket is there (always false for a publisher key)
   * @param {string} options.room  the room asked for; `room` becomes the gateway's answer once live
   * @param {() => MediaStreamTrack[]} options.getTracks  the live camera/microphone tracks to publish
   * @param {() => void} options.onLive  the tokens are in: `live` is true, the Stages are about to be joined
   * @param {(message: string) => void} options.onRefused  no tokens; nothing started
   * @param {() => void} options.onChange  anything in `stages` changed
   * @param {(message: string|null) => void} options.onProblems  what is wrong on the Stages now, or null
   * @param {(status: object|null) => void} options.onEventsStatus  the events stream's status; null after stop()
   *   (not after stop({ unloading: true }), which leaves the last status)
   * @param {() => void} options.onRoomChanged  the room may have gained or lost Stages
   * @param {() => void} options.onEnded  the room was ended; this session is over
   * @param {(message: string) => void} options.onError  a failure to show that stops nothing
   * @param {(waiting: boolean) => void} options.onTicketWait  waiting for the host app's new ticket, or not any more
   */
  constructor({ sdk, auth, room, getTracks, ...handlers }) {
    this.sdk = sdk;
    this.auth = auth; // dropped once the session is over
    this.ticketWaits = 0;
    this.room = room;
    this.getTracks = getTracks;
    this.handlers = handlers;
    this.fanout = null; // while live
    this.events = null; // PublisherEvents while live
    this.problems = new Map(); // stageArn -> problem text
  }

  get live() {
    return this.fanout !== null;
  }

  /** Plain snapshots of the Stages this page is on, for rendering and tests. */
  get stages() {
    return this.fanout ? this.fanout.stages : [];
  }

  async start() {
    let answer;
    for (let attempt = 0; ; attempt += 1) {
      const bearer = this.auth.bearer();
      try {
        answer = await getPublisherTokens(bearer, { room: this.room });
        break;
      } catch (error) {
        const retry = isTicketRefusal(error) && attempt === 0 && (await this.ticketRenewed(error.code, bearer));
        if (!retry) {
          this.handlers.onRefused(refusalText(error, this.auth.isTicket));
          return;
        }
      }
    }

    this.room = answer.room;
    this.fanout = new StageFanout({
      sdk: this.sdk,
      getTracks: this.getTracks,
      onPublishing: (stageArn, publishing, participantId) => this.report(stageArn, publishing, { participantId }),
      onProblem: (stageArn, problem) => this.problemChanged(stageArn, problem),
      onChange: () => this.handlers.onChange(),
    });
    this.handlers.onLive();
    this.fanout.sync(answer.tokens);
    this.handlers.onChange();
    this.follow();
    this.handlers.onRoomChanged();
  }

  /**
   * Leaves every Stage and tells the gateway; resolves once it has answered. With `unloading` the
   * page is going away: the reports go out with keepalive and nobody waits for them.
   */
  async stop({ unloading = false } = {}) {
    if (this.events) this.events.stop();
    this.events = null;
    if (!this.fanout) return;
    if (!unloading) this.handlers.onEventsStatus(null);
    const left = this.fanout.removeAll();
    this.fanout = null;
    if (unloading) {
      for (const stageArn of left) this.report(stageArn, false, { keepalive: true });
      return;
    }
    await Promise.allSettled(left.map((stageArn) => this.report(stageArn, false)));
    this.auth = null;
  }

  // Someone ended the room (DELETE /api/rooms/{room}, or it idled out): its Stages are being deleted,
  // so there is no publish state left to report.
  roomEnded() {
    if (this.fanout) this.fanout.removeAll();
    this.fanout = null;
    this.events = null;
    this.auth = null;
    this.handlers.onEnded();
  }

  follow() {
    const auth = this.auth;
    this.events = new PublisherEvents({
      bearer: () => auth.bearer(),
      // No time limit here: the stream waits for the new ticket until the session stops.
      renewed: (code, refused, signal) => this.ticketRenewed(code, refused, { signal, timeoutMs: 0 }),
      room: this.room,
      onSnapshot: (tokens) => this.fanout && this.fanout.sync(tokens),
      onStageAdded: (token) => {
        if (!this.fanout) return;
        this.fanout.add(token);
        this.handlers.onRoomChanged();
      },
      onStageRemoved: (stageArn) => {
        if (!this.fanout) return;
        this.fanout.remove(stageArn);
        this.handlers.onRoomChanged();
      },
      onRoomEnded: () => this.roomEnded(),
      onFatal: (error) => {
        const what = auth.isTicket ? 'the host app\'s ticket' : 'the publisher key';
        this.handlers.onError(
          error.status === 401
            ? `Stage updates: ${what} was rejected (401); new Stages are not joined.`
            : `Stage updates stopped: ${error.message}`,
        );
      },
      onStatus: (status) => this.handlers.onEventsStatus(status),
    });
    this.events.start();
  }

  async report(stageArn, publishing, options = {}) {
    const auth = this.auth;
    if (!auth) return;
    try {
      const bearer = auth.bearer();
      try {
        await reportPublishing(bearer, this.room, stageArn, publishing, options);
      } catch (error) {
        // A page going away (keepalive) cannot wait for a new ticket.
        const renewed = isTicketRefusal(error) && !options.keepalive && (await this.ticketRenewed(error.code, bearer));
        if (!renewed) throw error;
        await reportPublishing(auth.bearer(), this.room, stageArn, publishing, options);
      }
    } catch (error) {
      // 404: the Stage (or the room) is already gone, deleted by scale-in or by ending the room, maybe
      // between our join and this report. Its stage-removed or room-ended is on its way; nothing to say.
      if (error.status === 404) {
        console.info(`publisher status for stage ${stageId(stageArn)} not reported: the Stage is gone (${error.code})`);
        return;
      }
      console.warn(`publisher status report failed for stage ${stageId(stageArn)}: ${error.code}`);
      this.handlers.onError(`Could not report the publish state of Stage ${stageId(stageArn)}: ${error.message}`);
    }
  }

  /** Whether a ticket other than the `refused` one is there now, asking the host app for it if need
   * be (never for a key). */
  async ticketRenewed(code, refused, { signal, timeoutMs = TICKET_WAIT_MS } = {}) {
    if (!this.auth || !this.auth.isTicket) return false;
    if (this.auth.bearer() !== refused) return true; // it came while the refused one was on its way
    this.ticketWaits += 1;
    if (this.ticketWaits === 1) this.handlers.onTicketWait(true);
    try {
      return await this.auth.renewed(code, { signal, timeoutMs });
    } finally {
      this.ticketWaits -= 1;
      if (this.ticketWaits === 0) this.handlers.onTicketWait(false);
    }
  }

  problemChanged(stageArn, problem) {
    if (problem) this.problems.set(stageArn, problem);
    else this.problems.delete(stageArn);
    const text = [...this.problems].map(([arn, message]) => `Stage ${stageId(arn)}: ${message}`).join('\n');
    this.handlers.onProblems(text || null);
  }
}
