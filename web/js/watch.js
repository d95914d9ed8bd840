// The watch page: renders a ViewerSession (token, lease, subscribe-only Stage) onto a <video>; past
// the real-time ceiling the session names the room's channel instead and an OverflowPlayer plays it.
// A host app admits its viewers with a ticket in `#ticket=` or a `fanout:ticket` message (ticket.js).

import { getConfig } from './api.js';
import { OverflowPlayer } from './overflow-player.js';
import { loadStageSdk } from './sdk.js';
import { TicketHolder } from './ticket.js';
import { ViewerSession } from './viewer-session.js';
import { byId, clearError, roomFromQuery, setStatus, showError, stageId, storageGet, storageSet } from './ui.js';

// Before anything awaits: a host app may post the ticket as soon as the frame has loaded.
const tickets = new TicketHolder({ page: 'watch' });
tickets.listen();

const USER_ID_STORAGE = 'fanout.viewerUserId';
const DEFAULT_HEARTBEAT_SECONDS = 15;

const els = {
  video: byId('video'),
  overlay: byId('video-overlay'),
  unmute: byId('unmute'),
  status: byId('status'),
  tierNote: byId('tier-note'),
  tier: byId('tier'),
  error: byId('error'),
  roomName: byId('room-name'),
  stageId: byId('stage-id'),
  userId: byId('user-id'),
};

// Test hook; never holds the token or the ticket.
const view = {
  state: 'starting',
  mode: null,
  hasTicket: false,
  room: null,
  userId: null,
  stageArn: null,
  participantId: null,
  // realtime (on a Stage) or overflow (the room's channel, a few seconds behind); null before a token.
  tier: null,
  playbackUrl: null,
  message: '',
};
window.fanoutWatch = view;

const OVERLAY_TEXT = {
  connecting: 'Connecting…',
  'no-show': 'The show has not started yet',
  full: 'The show is full — retrying',
  joining: 'Joining…',
  waiting: 'Waiting for the broadcaster…',
  reconnecting: 'Reconnecting…',
  stopped: 'Stopped',
  error: 'Cannot play',
  ticket: 'A ticket is needed',
  overflow: 'Starting the stream…',
};

let session = null;
let shownTracks = [];
let player = null;
// The overflow player's own state, while the session is in the overflow tier.
let overflow = { state: 'loading', message: '' };

/** The session's state, with the overflow tier's playback folded in: playing once its video plays. */
function pageState(snapshot) {
  if (snapshot.state !== 'overflow') return snapshot.state;
  if (overflow.state === 'playing') return 'playing';
  return overflow.state === 'error' ? 'error' : 'overflow';
}

function statusText(snapshot) {
  if (pageState(snapshot) === 'playing') {
    return snapshot.state === 'overflow' ? 'Live, a few seconds behind.' : 'Live.';
  }
  if (snapshot.state === 'overflow' && overflow.message) return overflow.message;
  let text = snapshot.message || snapshot.state;
  if (snapshot.retryAt) {
    const seconds = Math.max(1, Math.round((snapshot.retryAt - Date.now()) / 1000));
    text += ` (next try in ${seconds} s)`;
  }
  return text;
}

function showTracks(tracks) {
  const same = tracks.length === shownTracks.length && tracks.every((t) => shownTracks.includes(t));
  if (same) return;
  shownTracks = tracks;
  // A fresh MediaStream per change: browsers start playback reliably on a new srcObject.
  els.video.srcObject = tracks.length ? new MediaStream(tracks) : null;
  if (tracks.length) els.video.play().catch(() => {});
}

function followTier(snapshot) {
  if (snapshot.state === 'overflow' && snapshot.playbackUrl) {
    // A Stage's tracks would win over the player's source: they go first.
    if (els.video.srcObject) showTracks([]);
    player.play(snapshot.playbackUrl);
  } else if (player.url) {
    player.stop();
    overflow = { state: 'loading', message: '' };
  }
}

function render(snapshot) {
  followTier(snapshot);
  const state = pageState(snapshot);
  Object.assign(view, {
    state,
    room: snapshot.room,
    userId: snapshot.userId,
    stageArn: snapshot.stageArn,
    participantId: snapshot.participantId,
    tier: snapshot.tier,
    playbackUrl: snapshot.playbackUrl,
    message: snapshot.state === 'overflow' && overflow.message ? overflow.message : snapshot.message,
    hasTicket: tickets.current !== null,
  });
  // A ticket's subject is the host app's user id: not kept beyond the visit.
  if (snapshot.userId && !tickets.current) storageSet('localStorage', USER_ID_STORAGE, snapshot.userId);

  setStatus(els.status, state, statusText(snapshot));
  els.tier.textContent = snapshot.tier === 'overflow' ? 'Overflow (a few seconds behind)' : snapshot.tier ? 'Real-time' : '—';
  els.tierNote.hidden = snapshot.state !== 'overflow';
  els.roomName.textContent = snapshot.room || '—';
  els.stageId.textContent = snapshot.stageArn ? stageId(snapshot.stageArn) : '—';
  els.stageId.title = snapshot.stageArn || '';
  els.stageId.dataset.stageArn = snapshot.stageArn || '';
  els.userId.textContent = snapshot.userId || '—';

  const playing = state === 'playing';
  els.overlay.hidden = playing;
  els.overlay.textContent = OVERLAY_TEXT[state] || state;
  els.unmute.hidden = !playing || !els.video.muted;
  if (state === 'error' || state === 'ticket') showError(els.error, view.message);
  else clearError(els.error);

  // The overflow player owns the <video> while the session is in that tier.
  if (snapshot.state !== 'overflow') showTracks(session ? session.tracks : []);
}

function unmute() {
  els.video.muted = false;
  els.video.play().catch(() => {});
  els.unmute.hidden = true;
}

async function main() {
  els.unmute.addEventListener('click', unmute);

  let config;
  try {
    config = await getConfig();
  } catch (error) {
    view.state = 'error';
    setStatus(els.status, 'error', 'Cannot start.');
    showError(els.error, `Could not load the configuration: ${error.message}`);
    return;
  }
  view.mode = config.mode;

  let sdk;
  try {
    sdk = await loadStageSdk(config);
  } catch (error) {
    view.state = 'error';
    setStatus(els.status, 'error', 'Cannot start.');
    showError(els.error, error.message);
    return;
  }

  player = new OverflowPlayer(els.video, (state, message = '') => {
    overflow = { state, message };
    if (session) render(session.snapshot);
  });
  const claims = tickets.claims();
  session = new ViewerSession({
    sdk,
    room: roomFromQuery(),
    shownRoom: (claims && claims.room) || config.defaultRoom || 'main',
    userId: storageGet('localStorage', USER_ID_STORAGE),
    heartbeatSeconds: config.heartbeatSeconds || DEFAULT_HEARTBEAT_SECONDS,
    tickets,
    onUpdate: render,
  });

  // Keep the "next try in N s" countdown moving.
  setInterval(() => {
    if (session.snapshot.retryAt) setStatus(els.status, session.snapshot.state, statusText(session.snapshot));
  }, 1000);
  window.addEventListener('pagehide', () => session.stop({ unloading: true }));
  // Back/forward cache: the page comes back without reloading, so start a new session.
  window.addEventListener('pageshow', (event) => {
    if (event.persisted) session.start();
  });
  session.start();
}

main();
