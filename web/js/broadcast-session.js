// One go-live of the broadcast page: publish tokens → a StageFanout over the room's Stages → the
// publisher events stream, until Stop, the page going away or the room ending. No DOM here; the page
// renders what the callbacks report and `stages`. The mirror of ViewerSession on the watch page.
//
// Go live asks POST /api/token/publisher-all once (it creates the room and answers a bad key with a
// plain 401), joins those Stages, then follows the publisher events stream while live: a snapshot
// re-syncs the set of Stages (on every reconnect too), stage-added joins a new Stage, stage-removed
// leaves one, room-ended ends the session. So the audience can grow the pool without a reload.

import { getPublisherTokens, reportPublishing } from './api.js';
import { PublisherEvents } from './publisher-events.js';
import { StageFanout } from './stage-fanout.js';
import { stageId } from './ui.js';

export class BroadcastSession {
  /**
   * @param {object} options
   * @param {object} options.sdk  SDK namespace from loadStageSdk()
   * @param {string} options.publisherKey
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
   */
  constructor({ sdk, publisherKey, room, getTracks, ...handlers }) {
    this.sdk = sdk;
    this.publisherKey = publisherKey; // dropped once the session is over
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
    try {
      answer = await getPublisherTokens(this.publisherKey, { room: this.room });
    } catch (error) {
      this.handlers.onRefused(
        error.status === 401
          ? 'The publisher key was rejected (401). Check it and try again.'
          : `Could not get publish tokens: ${error.message}`,
      );
      return;
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
    this.publisherKey = null;
  }

  // Someone ended the room (DELETE /api/rooms/{room}, or it idled out): its Stages are being deleted,
  // so there is no publish state left to report.
  roomEnded() {
    if (this.fanout) this.fanout.removeAll();
    this.fanout = null;
    this.events = null;
    this.publisherKey = null;
    this.handlers.onEnded();
  }

  follow() {
    this.events = new PublisherEvents({
      publisherKey: this.publisherKey,
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
        this.handlers.onError(
          error.status === 401
            ? 'Stage updates: the publisher key was rejected (401); new Stages are not joined.'
            : `Stage updates stopped: ${error.message}`,
        );
      },
      onStatus: (status) => this.handlers.onEventsStatus(status),
    });
    this.events.start();
  }

  async report(stageArn, publishing, options = {}) {
    if (!this.publisherKey) return;
    try {
      await reportPublishing(this.publisherKey, this.room, stageArn, publishing, options);
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

  problemChanged(stageArn, problem) {
    if (problem) this.problems.set(stageArn, problem);
    else this.problems.delete(stageArn);
    const text = [...this.problems].map(([arn, message]) => `Stage ${stageId(arn)}: ${message}`).join('\n');
    this.handlers.onProblems(text || null);
  }
}
