// Browser fan-out (DESIGN.md §5): one Stage per publish token, each with its own LocalStageStreams
// around clones of the camera and microphone tracks. No DOM here; the page renders `stages`.
//
// add/remove/sync are keyed by stageArn; the publisher events stream drives them (snapshot -> sync,
// stage-added -> add, stage-removed -> remove). A Stage deleted under us (STAGE_LEFT with reason
// stage-deleted, which can arrive just before the stream's stage-removed) is dropped quietly.
//
// Problems (onProblem) are per Stage and always describe the Stage as it is now: removing a Stage
// withdraws its problem, and a Stage joined again keeps its old problem only until the new join works.

import { describeStageError } from './sdk.js';

export class StageFanout {
  /**
   * @param {object} options
   * @param {object} options.sdk  SDK namespace from loadStageSdk()
   * @param {() => MediaStreamTrack[]} options.getTracks  the live camera/microphone tracks to clone
   * @param {(stageArn: string, publishing: boolean, participantId: string) => void} options.onPublishing
   *   local publish state flips; participantId is this page's id there (what IVS replicates)
   * @param {(stageArn: string, problem: string|null) => void} options.onProblem  errors, lost connections
   * @param {() => void} options.onChange  anything in `stages` changed
   */
  constructor({ sdk, getTracks, onPublishing, onProblem, onChange }) {
    this.sdk = sdk;
    this.getTracks = getTracks;
    this.onPublishing = onPublishing;
    this.onProblem = onProblem;
    this.onChange = onChange;
    this.entries = new Map();
  }

  /** Plain snapshots for rendering and for tests (window.fanoutBroadcast.stages). */
  get stages() {
    return [...this.entries.values()].map((entry) => ({
      stageArn: entry.stageArn,
      participantId: entry.participantId,
      publishState: entry.publishState,
      connectionState: entry.connectionState,
      problem: entry.problem,
    }));
  }

  get stageArns() {
    return [...this.entries.keys()];
  }

  /**
   * Adds Stages we are not on yet and leaves the ones no longer listed. A Stage we gave up on (join
   * failed, left) is joined again with the fresh token: a snapshot is the natural moment to retry.
   * A Stage whose join is still under way keeps the fresh token in reserve, in case that join fails
   * (its token may be the bad one the snapshot came to replace).
   */
  sync(tokens) {
    const wanted = new Set(tokens.map((t) => t.stageArn));
    for (const stageArn of this.stageArns) {
      if (!wanted.has(stageArn)) this.remove(stageArn);
    }
    for (const token of tokens) {
      const entry = this.entries.get(token.stageArn);
      if (!entry) this.add(token);
      else if (entry.publishState === 'errored' || entry.publishState === 'left') this.rejoin(entry, token);
      else if (entry.joining) entry.spareToken = token;
    }
  }

  add(tokenInfo) {
    if (this.entries.has(tokenInfo.stageArn)) return;
    this.start(tokenInfo, null);
  }

  remove(stageArn) {
    const entry = this.entries.get(stageArn);
    if (!entry) return;
    this.entries.delete(stageArn);
    this.teardown(entry);
    // The Stage is no longer ours: what went wrong on it is no longer a problem of this page.
    if (entry.problem) this.onProblem(stageArn, null);
    this.onChange();
  }

  /** Leaves every Stage; returns the ARNs that were left. */
  removeAll() {
    const left = this.stageArns;
    for (const stageArn of left) this.remove(stageArn);
    return left;
  }

  /** Leaves a Stage we gave up on and joins it again with a new token; its problem stays until that works. */
  rejoin(entry, tokenInfo) {
    this.teardown(entry);
    this.start(tokenInfo, entry.problem);
  }

  /** A new entry for the Stage, joined with the token; `problem` is the previous entry's, still shown. */
  start(tokenInfo, problem) {
    const entry = {
      stageArn: tokenInfo.stageArn,
      participantId: tokenInfo.participantId,
      publishState: 'joining',
      connectionState: null,
      problem,
      inheritedProblem: problem, // cleared once this join works, unless a newer problem replaced it
      joining: true, // join() has not settled yet
      spareToken: null, // a fresher token from a snapshot that arrived while joining
      stage: null,
      clones: [],
      published: false,
    };
    this.entries.set(entry.stageArn, entry);
    this.join(entry, tokenInfo.token);
    this.onChange();
  }

  join(entry, token) {
    const { Stage, LocalStageStream, SubscribeType, StageEvents, StageParticipantPublishState } = this.sdk;
    const stageDeleted = (this.sdk.StageLeftReason && this.sdk.StageLeftReason.STAGE_DELETED) || 'stage-deleted';
    entry.clones = this.getTracks().map((track) => track.clone());
    const streams = entry.clones.map((track) => new LocalStageStream(track));
    const strategy = {
      stageStreamsToPublish: () => streams,
      shouldPublishParticipant: () => true,
      shouldSubscribeToParticipant: () => SubscribeType.NONE,
    };

    const current = () => this.entries.get(entry.stageArn) === entry;
    // A Stage ending emits not-published, disconnected, then STAGE_LEFT in one go; react to the first
    // two only once we know the last was not "stage-deleted" (then the Stage is simply gone).
    const later = (react) =>
      queueMicrotask(() => {
        if (current() && entry.publishState !== 'left') react();
      });
    let stage;
    try {
      stage = new Stage(token, strategy); // throws at once on a malformed token
    } catch (error) {
      entry.joining = false;
      entry.publishState = 'errored';
      this.setProblem(entry, `cannot join: ${describeStageError(this.sdk, error)}`);
      return;
    }
    entry.stage = stage;

    stage.on(StageEvents.STAGE_PARTICIPANT_PUBLISH_STATE_CHANGED, (info, state) => {
      if (!info.isLocal || !current()) return;
      entry.publishState = state;
      if (state === StageParticipantPublishState.PUBLISHED) {
        this.setProblem(entry, null);
        this.setPublished(entry, true);
      } else {
        later(() => {
          if (state === StageParticipantPublishState.ERRORED && !entry.problem) this.setProblem(entry, 'publishing failed');
          this.setPublished(entry, false);
        });
      }
      this.onChange();
    });
    stage.on(StageEvents.STAGE_CONNECTION_STATE_CHANGED, (state) => {
      if (!current()) return;
      entry.connectionState = state;
      if (state === 'disconnected' || state === 'errored') {
        later(() => this.setProblem(entry, `connection ${state}; the SDK is retrying`));
      } else if (state === 'connected' && entry.problem && entry.problem.startsWith('connection')) {
        this.setProblem(entry, null);
      }
      this.onChange();
    });
    stage.on(StageEvents.ERROR, (error) => {
      if (!current()) return;
      this.setProblem(entry, describeStageError(this.sdk, error));
      this.onChange();
    });
    stage.on(StageEvents.STAGE_LEFT, (reason) => {
      if (!current()) return;
      if (reason === stageDeleted) {
        // Deleted by the stage manager's scale-in (the stream's stage-removed may still be on its way).
        this.remove(entry.stageArn);
        return;
      }
      entry.publishState = 'left';
      this.setPublished(entry, false);
      this.setProblem(entry, `left the Stage (${reason})`);
      this.onChange();
    });

    stage.join().then(
      () => {
        if (!current()) return;
        entry.joining = false;
        entry.spareToken = null;
        if (entry.inheritedProblem !== null && entry.problem === entry.inheritedProblem) this.setProblem(entry, null);
        this.onChange();
      },
      (error) => {
        if (!current()) return;
        entry.joining = false;
        entry.publishState = 'errored';
        this.setProblem(entry, `join failed: ${describeStageError(this.sdk, error)}`);
        // A snapshot that came while this join was under way brought a token we have not tried yet.
        if (entry.spareToken) this.rejoin(entry, entry.spareToken);
        else this.onChange();
      },
    );
  }

  setPublished(entry, published) {
    if (entry.published === published) return;
    entry.published = published;
    this.onPublishing(entry.stageArn, published, entry.participantId);
  }

  setProblem(entry, problem) {
    if (entry.problem === problem) return;
    entry.problem = problem;
    this.onProblem(entry.stageArn, problem);
  }

  teardown(entry) {
    if (entry.stage) {
      entry.stage.removeAllListeners();
      entry.stage.leave();
      entry.stage = null;
    }
    for (const track of entry.clones) track.stop();
    entry.clones = [];
  }
}
