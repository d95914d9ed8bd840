// Browser fan-out (DESIGN.md §5): one Stage per publish token, each with its own LocalStageStreams
// around clones of the camera and microphone tracks. No DOM here; the page renders `stages`.
//
// add/remove/sync are keyed by stageArn so the publisher events stream (snapshot, stage-added,
// stage-removed) can drive the same object later.

import { describeStageError } from './sdk.js';

export class StageFanout {
  /**
   * @param {object} options
   * @param {object} options.sdk  SDK namespace from loadStageSdk()
   * @param {() => MediaStreamTrack[]} options.getTracks  the live camera/microphone tracks to clone
   * @param {(stageArn: string, publishing: boolean) => void} options.onPublishing  local publish state flips
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

  /** Adds Stages we are not on yet and leaves the ones no longer listed. */
  sync(tokens) {
    const wanted = new Set(tokens.map((t) => t.stageArn));
    for (const stageArn of this.stageArns) {
      if (!wanted.has(stageArn)) this.remove(stageArn);
    }
    for (const token of tokens) this.add(token);
  }

  add(tokenInfo) {
    if (this.entries.has(tokenInfo.stageArn)) return;
    const entry = {
      stageArn: tokenInfo.stageArn,
      participantId: tokenInfo.participantId,
      publishState: 'joining',
      connectionState: null,
      problem: null,
      stage: null,
      clones: [],
      published: false,
    };
    this.entries.set(entry.stageArn, entry);
    this.join(entry, tokenInfo.token);
    this.onChange();
  }

  remove(stageArn) {
    const entry = this.entries.get(stageArn);
    if (!entry) return;
    this.entries.delete(stageArn);
    this.teardown(entry);
    this.onChange();
  }

  /** Leaves every Stage; returns the ARNs that were left. */
  removeAll() {
    const left = this.stageArns;
    for (const stageArn of left) this.remove(stageArn);
    return left;
  }

  join(entry, token) {
    const { Stage, LocalStageStream, SubscribeType, StageEvents, StageParticipantPublishState } = this.sdk;
    entry.clones = this.getTracks().map((track) => track.clone());
    const streams = entry.clones.map((track) => new LocalStageStream(track));
    const strategy = {
      stageStreamsToPublish: () => streams,
      shouldPublishParticipant: () => true,
      shouldSubscribeToParticipant: () => SubscribeType.NONE,
    };

    const current = () => this.entries.get(entry.stageArn) === entry;
    let stage;
    try {
      stage = new Stage(token, strategy); // throws at once on a malformed token
    } catch (error) {
      entry.publishState = 'errored';
      this.setProblem(entry, `cannot join: ${describeStageError(this.sdk, error)}`);
      return;
    }
    entry.stage = stage;

    stage.on(StageEvents.STAGE_PARTICIPANT_PUBLISH_STATE_CHANGED, (info, state) => {
      if (!info.isLocal || !current()) return;
      entry.publishState = state;
      if (state === StageParticipantPublishState.PUBLISHED) this.setProblem(entry, null);
      if (state === StageParticipantPublishState.ERRORED) this.setProblem(entry, 'publishing failed');
      this.setPublished(entry, state === StageParticipantPublishState.PUBLISHED);
      this.onChange();
    });
    stage.on(StageEvents.STAGE_CONNECTION_STATE_CHANGED, (state) => {
      if (!current()) return;
      entry.connectionState = state;
      if (state === 'disconnected' || state === 'errored') {
        this.setProblem(entry, `connection ${state}; the SDK is retrying`);
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
      entry.publishState = 'left';
      this.setPublished(entry, false);
      this.setProblem(entry, `left the Stage (${reason})`);
      this.onChange();
    });

    stage.join().catch((error) => {
      if (!current()) return;
      entry.publishState = 'errored';
      this.setProblem(entry, `join failed: ${describeStageError(this.sdk, error)}`);
      this.onChange();
    });
  }

  setPublished(entry, published) {
    if (entry.published === published) return;
    entry.published = published;
    this.onPublishing(entry.stageArn, published);
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
