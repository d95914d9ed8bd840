// A local stand-in for the IVS Web Broadcast SDK (amazon-ivs-web-broadcast 1.41, ivs-facts §5): the part
// of its surface the pages use, with the SDK's names, event strings and callback arguments. It talks to
// the IVS emulator's events socket (the token's events_url; protocol in services/ivslocal/events.py) and
// sends media browser to browser over RTCPeerConnection: the publisher offers to each subscriber that
// asks. No STUN/TURN: host candidates are enough on one machine or a LAN.

export const __version = 'local';

export const StageEvents = Object.freeze({
  STAGE_CONNECTION_STATE_CHANGED: 'stageConnectionStateChanged',
  STAGE_PARTICIPANT_JOINED: 'stageParticipantJoined',
  STAGE_PARTICIPANT_LEFT: 'stageParticipantLeft',
  STAGE_PARTICIPANT_STREAMS_ADDED: 'stageParticipantStreamsAdded',
  STAGE_PARTICIPANT_STREAMS_REMOVED: 'stageParticipantStreamsRemoved',
  STAGE_PARTICIPANT_PUBLISH_STATE_CHANGED: 'stageParticipantPublishStateChanged',
  STAGE_PARTICIPANT_SUBSCRIBE_STATE_CHANGED: 'stageParticipantSubscribeStateChanged',
  STAGE_STREAM_MUTE_CHANGED: 'stageStreamMuteChanged',
  STAGE_PARTICIPANT_METADATA_CHANGED: 'stageParticipantMetadataChanged',
  ERROR: 'error',
  STAGE_LEFT: 'stageLeft',
});

export const StageConnectionState = Object.freeze({
  DISCONNECTED: 'disconnected',
  CONNECTING: 'connecting',
  CONNECTED: 'connected',
  ERRORED: 'errored',
});

export const StageParticipantPublishState = Object.freeze({
  NOT_PUBLISHED: 'not_published',
  ATTEMPTING_PUBLISH: 'attempting_publish',
  PUBLISHED: 'published',
  ERRORED: 'errored',
});

export const StageParticipantSubscribeState = Object.freeze({
  NOT_SUBSCRIBED: 'not_subscribed',
  ATTEMPTING_SUBSCRIBE: 'attempting_subscribe',
  SUBSCRIBED: 'subscribed',
  ERRORED: 'errored',
});

export const SubscribeType = Object.freeze({ NONE: 'none', AUDIO_ONLY: 'audio_only', AUDIO_VIDEO: 'audio_video' });
export const StageSubscribeStreamType = Object.freeze({ AUDIO: 'audio', VIDEO: 'video', SUBTITLES: 'subtitles' });
export const StreamType = Object.freeze({ AUDIO: 'audio', VIDEO: 'video' });
export const StageErrorCategory = Object.freeze({
  JOIN_ERROR: 'JOIN_ERROR',
  PUBLISH_ERROR: 'PUBLISH_ERROR',
  SUBSCRIBE_ERROR: 'SUBSCRIBE_ERROR',
});

export const StageLeftReason = Object.freeze({
  USER_INITIATED: 'user-initiated',
  TOKEN_REUSED: 'token-reused',
  PARTICIPANT_DISCONNECTED: 'participant-disconnected',
  STAGE_DELETED: 'stage-deleted',
  FAILED_EXCHANGE: 'failed-exchange',
  REAL_TIME_CONNECTION_FORCED_LEAVE: 'real-time-connection-forced-leave',
  REAL_TIME_CONNECTION_TOKEN_REVOCATION: 'real-time-connection-token-revocation',
  UNKNOWN: 'unknown',
});

// Like the SDK's TypeScript enum: StageErrorCode.TOKEN_EXPIRED === 2 and StageErrorCode[2] === 'TOKEN_EXPIRED'.
export const StageErrorCode = (() => {
  const names = [
    'TOKEN_MALFORMED', 'TOKEN_EXPIRED', 'TIMEOUT', 'FAILED', 'CANCELED', 'STAGE_AT_CAPACITY', 'CODEC_MISMATCH',
    'TOKEN_NOT_ALLOWED', 'STAGE_DELETED', 'PARTICIPANT_DISCONNECTED', 'TOKEN_EXCHANGE_REQUEST_INVALID',
    'TOKEN_EXCHANGE_FAILED',
  ];
  const codes = {};
  names.forEach((name, index) => {
    codes[name] = index + 1;
    codes[index + 1] = name;
  });
  return Object.freeze(codes);
})();

const JOIN_TIMEOUT_MS = 10000;
const SUBSCRIBE_TIMEOUT_MS = 15000;
// About 30 s of retries after a lost connection, as the SDK does before it reports FAILED (ivs-facts §6.6).
const RECONNECT_DELAYS_MS = [1000, 2000, 4000, 8000, 8000, 8000];
const SUBSCRIBE_RETRY_MAX_MS = 8000;
const CLOSE_JOIN_REFUSED_BASE = 4000;
const RTC_CONFIGURATION = { iceServers: [], bundlePolicy: 'max-bundle' };

/** The SDK's StageError: an Error with code, category, and a "[CATEGORY] text" message. */
export class StageError extends Error {
  constructor(code, category, message) {
    super(`[${category}] ${message}`);
    this.name = 'StageError';
    this.code = code;
    this.category = category;
  }
}

export class StageStream {
  constructor(mediaStreamTrack) {
    this.mediaStreamTrack = mediaStreamTrack;
    this.streamType = mediaStreamTrack.kind === 'audio' ? StreamType.AUDIO : StreamType.VIDEO;
  }

  get isMuted() {
    return !this.mediaStreamTrack.enabled || this.mediaStreamTrack.muted;
  }
}

export class LocalStageStream extends StageStream {
  /** @param {MediaStreamTrack} track  @param {object} [config]  e.g. {maxVideoBitrateKbps} or {maxAudioBitrateKbps} */
  constructor(track, config = {}) {
    if (!track || (track.kind !== 'audio' && track.kind !== 'video')) {
      throw new TypeError('LocalStageStream needs an audio or video MediaStreamTrack');
    }
    super(track);
    this.config = config || {};
  }

  setMuted(muted) {
    this.mediaStreamTrack.enabled = !muted;
  }

  get maxBitrateBps() {
    const kbps = this.streamType === StreamType.VIDEO ? this.config.maxVideoBitrateKbps : this.config.maxAudioBitrateKbps;
    return typeof kbps === 'number' && kbps > 0 ? kbps * 1000 : null;
  }
}

export class RemoteStageStream extends StageStream {
  constructor(mediaStreamTrack, participantInfo) {
    super(mediaStreamTrack);
    this.participantInfo = participantInfo;
  }
}

export function isSupported() {
  return typeof RTCPeerConnection === 'function' && typeof WebSocket === 'function';
}

// ---- tokens ------------------------------------------------------------------------------------

function malformed(detail) {
  return new StageError(StageErrorCode.TOKEN_MALFORMED, StageErrorCategory.JOIN_ERROR, `Token is malformed: ${detail}`);
}

function decodeClaims(token) {
  const parts = typeof token === 'string' ? token.split('.') : [];
  if (parts.length !== 3) throw malformed('not a JWT');
  let claims;
  try {
    const base64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const text = new TextDecoder().decode(Uint8Array.from(atob(base64), (c) => c.charCodeAt(0)));
    claims = JSON.parse(text);
  } catch {
    throw malformed('the payload is not base64url JSON');
  }
  if (!claims || typeof claims !== 'object') throw malformed('the payload is not an object');
  if (typeof claims.jti !== 'string' || !claims.jti) throw malformed('no jti');
  if (typeof claims.events_url !== 'string') throw malformed('no events_url');
  return claims;
}

/** The SDK checks exp with the browser clock, no grace, before join and before each subscribe (§6.5). */
function tokenExpired(claims) {
  return typeof claims.exp !== 'number' || Date.now() / 1000 >= claims.exp;
}

function expiredError(category) {
  return new StageError(StageErrorCode.TOKEN_EXPIRED, category, 'Token expired and is no longer valid');
}

const LOOPBACK = new Set(['localhost', '127.0.0.1', '[::1]']);

/** The events socket address; a loopback one follows the page's host so a phone on the LAN reaches it. */
function socketAddress(eventsUrl) {
  let url;
  try {
    url = new URL(eventsUrl);
  } catch {
    throw malformed('events_url is not a URL');
  }
  if (url.protocol !== 'ws:' && url.protocol !== 'wss:') throw malformed('events_url is not a ws: or wss: URL');
  if (LOOPBACK.has(url.hostname) && !LOOPBACK.has(window.location.hostname)) url.hostname = window.location.hostname;
  return url.href;
}

function randomId() {
  return Math.random().toString(36).slice(2, 10) + Date.now().toString(36);
}

function parseFrame(data) {
  try {
    const frame = JSON.parse(data);
    return frame && typeof frame === 'object' && typeof frame.type === 'string' ? frame : null;
  } catch {
    return null;
  }
}

function wantedKinds(answer) {
  if (Array.isArray(answer)) {
    return { audio: answer.includes(StageSubscribeStreamType.AUDIO), video: answer.includes(StageSubscribeStreamType.VIDEO) };
  }
  if (answer === SubscribeType.AUDIO_VIDEO) return { audio: true, video: true };
  if (answer === SubscribeType.AUDIO_ONLY) return { audio: true, video: false };
  return { audio: false, video: false };
}

/** Runs async steps of one peer connection strictly in order (signalling frames arrive in order). */
class SerialQueue {
  constructor(onError) {
    this.tail = Promise.resolve();
    this.onError = onError;
  }

  run(step) {
    this.tail = this.tail.then(step).catch(this.onError);
    return this.tail;
  }
}

// ---- peer connections ----------------------------------------------------------------------------

/** The publisher's end of one subscription: it offers its tracks to one subscriber. */
class OutgoingPeer {
  constructor(stage, subscriberId, subscriptionId, kinds, streams) {
    this.stage = stage;
    this.subscriberId = subscriberId;
    this.id = subscriptionId;
    this.closed = false;
    this.offerSent = false;
    this.heldCandidates = [];
    this.queue = new SerialQueue((error) => this.fail(error));
    this.pc = new RTCPeerConnection(RTC_CONFIGURATION);
    const mediaStream = new MediaStream();
    for (const stream of streams) {
      const track = stream.mediaStreamTrack;
      if (track.readyState !== 'live' || !kinds[track.kind]) continue;
      mediaStream.addTrack(track);
      const bitrate = stream.maxBitrateBps;
      this.pc.addTransceiver(track, {
        direction: 'sendonly',
        streams: [mediaStream],
        sendEncodings: bitrate ? [{ maxBitrate: bitrate }] : undefined,
      });
    }
    this.pc.onicecandidate = (event) => {
      const candidate = event.candidate ? event.candidate.toJSON() : null;
      if (this.offerSent) this.sendCandidate(candidate);
      else this.heldCandidates.push(candidate);
    };
    this.pc.onconnectionstatechange = () => {
      if (this.pc.connectionState === 'failed') this.fail(new Error('peer connection failed'));
    };
  }

  start() {
    this.queue.run(async () => {
      await this.pc.setLocalDescription(await this.pc.createOffer());
      if (this.closed) return;
      this.stage.send({ type: 'offer', to: this.subscriberId, id: this.id, sdp: this.pc.localDescription.sdp });
      this.offerSent = true;
      for (const candidate of this.heldCandidates.splice(0)) this.sendCandidate(candidate);
    });
  }

  sendCandidate(candidate) {
    if (!this.closed) this.stage.send({ type: 'candidate', to: this.subscriberId, id: this.id, candidate });
  }

  onAnswer(sdp) {
    this.queue.run(() => (this.closed ? null : this.pc.setRemoteDescription({ type: 'answer', sdp })));
  }

  onCandidate(candidate) {
    if (candidate) this.queue.run(() => (this.closed ? null : this.pc.addIceCandidate(candidate)));
  }

  fail(error) {
    if (this.closed) return;
    console.warn(`local stage: sending to ${this.subscriberId} stopped: ${error && error.message}`);
    this.stage.dropOutgoing(this);
  }

  close() {
    this.closed = true;
    this.pc.close();
  }
}

/** The subscriber's end: it asks a publisher for its tracks, answers the offer and reports the streams. */
class Subscription {
  constructor(stage, remote, kinds) {
    this.stage = stage;
    this.remote = remote;
    this.kinds = kinds;
    this.id = randomId();
    this.pc = null;
    this.closed = false;
    this.streams = [];
    this.announced = false;
    this.heldCandidates = [];
    this.queue = new SerialQueue((error) => this.fail(error));
    this.timer = setTimeout(() => this.fail(new Error('no media in time')), SUBSCRIBE_TIMEOUT_MS);
  }

  start() {
    this.stage.send({ type: 'subscribe', to: this.remote.info.id, id: this.id, ...this.kinds });
  }

  onOffer(sdp) {
    this.queue.run(async () => {
      if (this.closed) return;
      const pc = new RTCPeerConnection(RTC_CONFIGURATION);
      this.pc = pc;
      const tracks = [];
      pc.ontrack = (event) => {
        if (!tracks.includes(event.track)) tracks.push(event.track);
      };
      pc.onicecandidate = (event) => {
        if (this.closed) return;
        const candidate = event.candidate ? event.candidate.toJSON() : null;
        this.stage.send({ type: 'candidate', to: this.remote.info.id, id: this.id, candidate });
      };
      pc.onconnectionstatechange = () => {
        if (pc.connectionState === 'connected') this.connected(tracks);
        else if (pc.connectionState === 'failed') this.fail(new Error('peer connection failed'));
      };
      await pc.setRemoteDescription({ type: 'offer', sdp });
      for (const candidate of this.heldCandidates.splice(0)) await pc.addIceCandidate(candidate);
      await pc.setLocalDescription(await pc.createAnswer());
      if (!this.closed) this.stage.send({ type: 'answer', to: this.remote.info.id, id: this.id, sdp: pc.localDescription.sdp });
    });
  }

  onCandidate(candidate) {
    if (!candidate) return;
    this.queue.run(async () => {
      if (this.closed) return;
      if (this.pc && this.pc.remoteDescription) await this.pc.addIceCandidate(candidate);
      else this.heldCandidates.push(candidate);
    });
  }

  connected(tracks) {
    if (this.closed || this.announced) return;
    clearTimeout(this.timer);
    this.announced = true;
    this.streams = tracks.map((track) => new RemoteStageStream(track, this.remote.info));
    this.stage.subscriptionReady(this);
  }

  fail(error) {
    if (this.closed) return;
    console.warn(`local stage: subscription to ${this.remote.info.id} failed: ${error && error.message}`);
    this.stage.subscriptionFailed(this);
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.pc) this.pc.close();
  }
}

// ---- Stage -------------------------------------------------------------------------------------

export class Stage {
  /**
   * @param {string} token  a participant token whose events_url names the emulator's socket
   * @param {object} strategy  {stageStreamsToPublish, shouldPublishParticipant, shouldSubscribeToParticipant}
   */
  constructor(token, strategy) {
    this.claims = decodeClaims(token); // throws TOKEN_MALFORMED at once, as the SDK does
    this.address = socketAddress(this.claims.events_url);
    this.token = token;
    this.strategy = strategy;
    this.listeners = new Map();
    const capabilities = this.claims.capabilities || {};
    this.local = {
      id: this.claims.jti,
      userId: this.claims.user_id || '',
      attributes: this.claims.attributes || {},
      capabilities: { allow_publish: capabilities.allow_publish === true, allow_subscribe: capabilities.allow_subscribe === true },
      isLocal: true,
      isPublishing: false,
      audioMuted: false,
      videoStopped: false,
    };
    this.connectionState = StageConnectionState.DISCONNECTED;
    this.ws = null;
    this.joinPromise = null;
    this.cancelJoin = null;
    this.ended = false; // left, kicked or given up: nothing more happens on this Stage
    this.remotes = new Map(); // participant id -> {info, subscription, retryTimer, retries}
    this.outgoing = new Map(); // `${subscriberId}/${subscriptionId}` -> OutgoingPeer
    this.publishState = StageParticipantPublishState.NOT_PUBLISHED;
    this.publishedStreams = [];
    this.publishAsked = false; // a publish frame went out on the current socket
    this.reconnectTimer = null;
  }

  // ---- the SDK's public surface ----

  on(event, callback) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(callback);
    return this;
  }

  off(event, callback) {
    const set = this.listeners.get(event);
    if (set) set.delete(callback);
    return this;
  }

  removeAllListeners(event) {
    if (event === undefined) this.listeners.clear();
    else this.listeners.delete(event);
    return this;
  }

  join() {
    if (this.joinPromise) return this.joinPromise;
    if (tokenExpired(this.claims)) return Promise.reject(expiredError(StageErrorCategory.JOIN_ERROR));
    this.joinPromise = this.connect().catch((error) => {
      this.joinPromise = null;
      this.setConnectionState(StageConnectionState.DISCONNECTED);
      throw error;
    });
    return this.joinPromise;
  }

  leave() {
    if (this.ended) return;
    if (this.cancelJoin) this.cancelJoin();
    const wasConnected = this.ws !== null;
    if (wasConnected) this.send({ type: 'leave' });
    this.end(StageLeftReason.USER_INITIATED);
  }

  refreshStrategy() {
    if (this.connectionState === StageConnectionState.CONNECTED && !this.ended) this.applyStrategy();
  }

  replaceStrategy(strategy) {
    this.strategy = strategy;
    this.refreshStrategy();
  }

  // ---- internals ----

  emit(event, ...args) {
    for (const callback of [...(this.listeners.get(event) || [])]) {
      try {
        callback(...args);
      } catch (error) {
        // A broken listener must not break the Stage; report it where the page's errors go.
        setTimeout(() => {
          throw error;
        });
      }
    }
  }

  setConnectionState(state) {
    if (this.connectionState === state) return;
    this.connectionState = state;
    this.emit(StageEvents.STAGE_CONNECTION_STATE_CHANGED, state);
  }

  send(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
  }

  /** Opens the socket and joins; resolves once the emulator has accepted the token. */
  connect() {
    this.setConnectionState(StageConnectionState.CONNECTING);
    return new Promise((resolve, reject) => {
      let settled = false;
      const ws = new WebSocket(this.address);
      const fail = (error) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.cancelJoin = null;
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        ws.close();
        reject(error);
      };
      const timer = setTimeout(
        () => fail(new StageError(StageErrorCode.TIMEOUT, StageErrorCategory.JOIN_ERROR, 'Timed out joining the stage')),
        JOIN_TIMEOUT_MS,
      );
      this.cancelJoin = () => fail(new StageError(StageErrorCode.CANCELED, StageErrorCategory.JOIN_ERROR, 'Join canceled by leave()'));
      ws.onopen = () => ws.send(JSON.stringify({ type: 'join', token: this.token }));
      ws.onerror = () => {}; // a close event follows
      ws.onclose = (event) => {
        const code = event.code - CLOSE_JOIN_REFUSED_BASE;
        if (code >= 1 && code <= 12) fail(new StageError(code, StageErrorCategory.JOIN_ERROR, event.reason || StageErrorCode[code]));
        else fail(new StageError(StageErrorCode.FAILED, StageErrorCategory.JOIN_ERROR, 'Could not reach the stage'));
      };
      ws.onmessage = (event) => {
        const frame = parseFrame(event.data);
        if (!frame || settled) return;
        if (frame.type === 'error') {
          fail(new StageError(frame.code || StageErrorCode.FAILED, StageErrorCategory.JOIN_ERROR, frame.message || frame.name));
        } else if (frame.type === 'joined') {
          settled = true;
          clearTimeout(timer);
          this.cancelJoin = null;
          this.ws = ws;
          ws.onmessage = (message) => this.onFrame(parseFrame(message.data));
          ws.onclose = () => this.onSocketClosed(ws);
          this.onJoined(frame);
          resolve();
        }
      };
    });
  }

  onJoined(frame) {
    this.setConnectionState(StageConnectionState.CONNECTED);
    this.emit(StageEvents.STAGE_PARTICIPANT_JOINED, { ...this.local });
    for (const info of frame.participants || []) this.addRemote(info);
    this.applyStrategy();
  }

  onFrame(frame) {
    if (!frame || this.ended) return;
    const from = frame.from;
    switch (frame.type) {
      case 'participant-joined':
        this.removeRemote(frame.participant.id);
        this.addRemote(frame.participant);
        this.applySubscription(this.remotes.get(frame.participant.id));
        break;
      case 'participant-left':
        this.removeRemote(frame.participantId);
        break;
      case 'publish-state':
        if (frame.participantId === this.local.id) this.onLocalPublishState(frame.publishing);
        else this.onRemotePublishState(frame.participantId, frame.publishing);
        break;
      case 'subscribe':
        this.onSubscribeRequest(from, frame);
        break;
      case 'unsubscribe': {
        const peer = this.outgoing.get(`${from}/${frame.id}`);
        if (peer) this.dropOutgoing(peer);
        break;
      }
      case 'answer': {
        const peer = this.outgoing.get(`${from}/${frame.id}`);
        if (peer) peer.onAnswer(frame.sdp);
        break;
      }
      case 'offer': {
        const subscription = this.subscriptionFor(from, frame.id);
        if (subscription) subscription.onOffer(frame.sdp);
        break;
      }
      case 'candidate': {
        const target = this.outgoing.get(`${from}/${frame.id}`) || this.subscriptionFor(from, frame.id);
        if (target) target.onCandidate(frame.candidate);
        break;
      }
      case 'error':
        this.onErrorFrame(frame);
        break;
      case 'stage-left':
        this.end(frame.reason || StageLeftReason.UNKNOWN);
        break;
      default:
        break;
    }
  }

  onErrorFrame(frame) {
    if (frame.id) {
      const remote = this.remotes.get(frame.to);
      if (remote && remote.subscription && remote.subscription.id === frame.id) this.subscriptionFailed(remote.subscription);
      return;
    }
    if (this.publishState === StageParticipantPublishState.ATTEMPTING_PUBLISH) {
      this.setLocalPublishState(StageParticipantPublishState.ERRORED);
      this.emit(StageEvents.ERROR, new StageError(frame.code || StageErrorCode.FAILED, StageErrorCategory.PUBLISH_ERROR, frame.message));
      return;
    }
    console.warn(`local stage: the emulator refused a request: ${frame.name} ${frame.message}`);
  }

  // The socket closed without a stage-left: the emulator went away or the network dropped.
  onSocketClosed(ws) {
    if (ws !== this.ws || this.ended) return;
    this.ws = null;
    this.publishAsked = false;
    this.dropPeers();
    if (this.publishState === StageParticipantPublishState.PUBLISHED) {
      this.setLocalPublishState(StageParticipantPublishState.ATTEMPTING_PUBLISH);
    }
    this.setConnectionState(StageConnectionState.DISCONNECTED);
    this.reconnect(0);
  }

  reconnect(attempt) {
    if (this.ended) return;
    if (attempt >= RECONNECT_DELAYS_MS.length) {
      this.giveUp(new StageError(StageErrorCode.FAILED, StageErrorCategory.JOIN_ERROR, 'Lost the connection to the stage'));
      return;
    }
    this.reconnectTimer = setTimeout(() => {
      if (this.ended) return;
      if (tokenExpired(this.claims)) {
        this.giveUp(expiredError(StageErrorCategory.JOIN_ERROR));
        return;
      }
      this.connect().catch((error) => {
        if (this.ended) return;
        const transient = error.code === StageErrorCode.FAILED || error.code === StageErrorCode.TIMEOUT;
        if (transient) {
          this.setConnectionState(StageConnectionState.DISCONNECTED);
          this.reconnect(attempt + 1);
        } else {
          this.giveUp(error);
        }
      });
    }, RECONNECT_DELAYS_MS[attempt]);
  }

  giveUp(error) {
    this.setConnectionState(StageConnectionState.ERRORED);
    this.emit(StageEvents.ERROR, error);
    this.end(StageLeftReason.UNKNOWN, { quiet: true });
  }

  /** Nothing more happens on this Stage: close everything and (unless quiet) emit STAGE_LEFT. */
  end(reason, { quiet = false } = {}) {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.reconnectTimer);
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onmessage = ws.onclose = ws.onerror = null;
      ws.close();
    }
    this.dropPeers();
    if (this.publishState !== StageParticipantPublishState.NOT_PUBLISHED) {
      this.setLocalPublishState(StageParticipantPublishState.NOT_PUBLISHED);
    }
    if (this.connectionState !== StageConnectionState.ERRORED) this.setConnectionState(StageConnectionState.DISCONNECTED);
    if (!quiet) this.emit(StageEvents.STAGE_LEFT, reason);
  }

  dropPeers() {
    for (const peer of this.outgoing.values()) peer.close();
    this.outgoing.clear();
    for (const id of [...this.remotes.keys()]) this.removeRemote(id);
  }

  // ---- participants ----

  addRemote(info) {
    const remote = {
      info: { ...info, isLocal: false, audioMuted: false, videoStopped: false },
      subscription: null,
      retryTimer: null,
      retries: 0,
    };
    this.remotes.set(info.id, remote);
    this.emit(StageEvents.STAGE_PARTICIPANT_JOINED, { ...remote.info });
  }

  removeRemote(id) {
    const remote = this.remotes.get(id);
    for (const peer of [...this.outgoing.values()]) if (peer.subscriberId === id) this.dropOutgoing(peer);
    if (!remote) return;
    this.endSubscription(remote, { tell: false });
    clearTimeout(remote.retryTimer);
    this.remotes.delete(id);
    this.emit(StageEvents.STAGE_PARTICIPANT_LEFT, { ...remote.info });
  }

  onRemotePublishState(id, publishing) {
    const remote = this.remotes.get(id);
    if (!remote || remote.info.isPublishing === publishing) return;
    remote.info.isPublishing = publishing;
    if (!publishing) this.endSubscription(remote, { tell: false });
    const state = publishing ? StageParticipantPublishState.PUBLISHED : StageParticipantPublishState.NOT_PUBLISHED;
    this.emit(StageEvents.STAGE_PARTICIPANT_PUBLISH_STATE_CHANGED, { ...remote.info }, state);
    this.applySubscription(remote);
  }

  // ---- strategy ----

  applyStrategy() {
    const wantsToPublish = this.local.capabilities.allow_publish && Boolean(this.strategy.shouldPublishParticipant({ ...this.local }));
    const idle =
      this.publishState === StageParticipantPublishState.NOT_PUBLISHED || this.publishState === StageParticipantPublishState.ERRORED;
    // After a reconnect the state still says attempting_publish, but the new socket has not asked yet.
    if (wantsToPublish && (idle || !this.publishAsked)) this.startPublishing();
    else if (!wantsToPublish && !idle) this.stopPublishing();
    for (const remote of this.remotes.values()) this.applySubscription(remote);
  }

  applySubscription(remote) {
    if (!remote || this.ended) return;
    const kinds = this.local.capabilities.allow_subscribe
      ? wantedKinds(this.strategy.shouldSubscribeToParticipant({ ...remote.info }))
      : { audio: false, video: false };
    const wanted = kinds.audio || kinds.video;
    if (!wanted || !remote.info.isPublishing) {
      clearTimeout(remote.retryTimer);
      remote.retryTimer = null;
      if (remote.subscription) this.endSubscription(remote, { tell: true });
      return; // with a wanted but unpublished participant, publish-state will bring us back here
    }
    if (remote.subscription || remote.retryTimer) return;
    if (tokenExpired(this.claims)) {
      this.emit(StageEvents.STAGE_PARTICIPANT_SUBSCRIBE_STATE_CHANGED, { ...remote.info }, StageParticipantSubscribeState.ERRORED);
      this.emit(StageEvents.ERROR, expiredError(StageErrorCategory.SUBSCRIBE_ERROR));
      return;
    }
    remote.subscription = new Subscription(this, remote, kinds);
    this.emit(StageEvents.STAGE_PARTICIPANT_SUBSCRIBE_STATE_CHANGED, { ...remote.info }, StageParticipantSubscribeState.ATTEMPTING_SUBSCRIBE);
    remote.subscription.start();
  }

  subscriptionFor(publisherId, subscriptionId) {
    const remote = this.remotes.get(publisherId);
    const subscription = remote && remote.subscription;
    return subscription && subscription.id === subscriptionId ? subscription : null;
  }

  subscriptionReady(subscription) {
    const remote = subscription.remote;
    if (remote.subscription !== subscription) return;
    remote.retries = 0;
    this.emit(StageEvents.STAGE_PARTICIPANT_SUBSCRIBE_STATE_CHANGED, { ...remote.info }, StageParticipantSubscribeState.SUBSCRIBED);
    this.emit(StageEvents.STAGE_PARTICIPANT_STREAMS_ADDED, { ...remote.info }, subscription.streams);
  }

  subscriptionFailed(subscription) {
    const remote = subscription.remote;
    if (remote.subscription !== subscription) return;
    this.endSubscription(remote, { tell: true, state: StageParticipantSubscribeState.ERRORED });
    const delay = Math.min(SUBSCRIBE_RETRY_MAX_MS, 1000 * 2 ** remote.retries++);
    remote.retryTimer = setTimeout(() => {
      remote.retryTimer = null;
      if (this.remotes.get(remote.info.id) === remote) this.applySubscription(remote);
    }, delay);
  }

  endSubscription(remote, { tell, state = StageParticipantSubscribeState.NOT_SUBSCRIBED }) {
    const subscription = remote.subscription;
    if (!subscription) return;
    remote.subscription = null;
    subscription.close();
    if (tell) this.send({ type: 'unsubscribe', to: remote.info.id, id: subscription.id });
    if (subscription.announced) this.emit(StageEvents.STAGE_PARTICIPANT_STREAMS_REMOVED, { ...remote.info }, subscription.streams);
    this.emit(StageEvents.STAGE_PARTICIPANT_SUBSCRIBE_STATE_CHANGED, { ...remote.info }, state);
  }

  // ---- publishing ----

  setLocalPublishState(state) {
    if (this.publishState === state) return;
    const wasPublished = this.publishState === StageParticipantPublishState.PUBLISHED;
    this.publishState = state;
    this.local.isPublishing = state === StageParticipantPublishState.PUBLISHED;
    if (wasPublished && !this.local.isPublishing) {
      this.emit(StageEvents.STAGE_PARTICIPANT_STREAMS_REMOVED, { ...this.local }, this.publishedStreams);
    }
    this.emit(StageEvents.STAGE_PARTICIPANT_PUBLISH_STATE_CHANGED, { ...this.local }, state);
    if (this.local.isPublishing) {
      this.emit(StageEvents.STAGE_PARTICIPANT_STREAMS_ADDED, { ...this.local }, this.publishedStreams);
    }
  }

  startPublishing() {
    this.publishedStreams = [...(this.strategy.stageStreamsToPublish() || [])];
    this.setLocalPublishState(StageParticipantPublishState.ATTEMPTING_PUBLISH);
    this.send({ type: 'publish' });
    this.publishAsked = true;
  }

  stopPublishing() {
    for (const peer of [...this.outgoing.values()]) this.dropOutgoing(peer);
    this.send({ type: 'unpublish' });
    this.publishAsked = false;
    this.setLocalPublishState(StageParticipantPublishState.NOT_PUBLISHED);
  }

  onLocalPublishState(publishing) {
    if (publishing && this.publishState === StageParticipantPublishState.ATTEMPTING_PUBLISH) {
      this.setLocalPublishState(StageParticipantPublishState.PUBLISHED);
    }
  }

  onSubscribeRequest(subscriberId, frame) {
    // Subscribers ask only publishers they saw publishing; a stale ask is dropped and they retry.
    if (this.publishState !== StageParticipantPublishState.PUBLISHED || !subscriberId || !frame.id) return;
    const kinds = { audio: frame.audio !== false, video: frame.video !== false };
    const peer = new OutgoingPeer(this, subscriberId, frame.id, kinds, this.publishedStreams);
    this.outgoing.set(`${subscriberId}/${frame.id}`, peer);
    peer.start();
  }

  dropOutgoing(peer) {
    const key = `${peer.subscriberId}/${peer.id}`;
    if (this.outgoing.get(key) === peer) this.outgoing.delete(key);
    peer.close();
  }
}
