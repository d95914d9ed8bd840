// The broadcast page: camera preview, Go live, Stop, and the room's Stages table. Going live (tokens,
// the fan-out, the publisher events stream) lives in BroadcastSession; this module renders it. A host
// app's publisher ticket (`#ticket=` or a `fanout:ticket` message, ticket.js) replaces the key.

import { getConfig, getRoom } from './api.js';
import { BroadcastSession } from './broadcast-session.js';
import { loadStageSdk } from './sdk.js';
import { renderCeiling, renderStagesTable } from './stages-table.js';
import { TicketHolder } from './ticket.js';
import {
  ROOM_PATTERN,
  byId,
  clearError,
  roomFromQuery,
  setStatus,
  showError,
  storageGet,
  storageSet,
} from './ui.js';

const ROOM_REFRESH_MS = 2000;
const KEY_STORAGE = 'fanout.publisherKey';

// Before anything awaits: a host app may post the ticket as soon as the frame has loaded.
const tickets = new TicketHolder({ page: 'broadcast' });
tickets.listen();

const els = {
  status: byId('status'),
  fanoutSummary: byId('fanout-summary'),
  publishingCount: byId('publishing-count'),
  eventsState: byId('events-state'),
  modeNote: byId('mode-note'),
  ticketNote: byId('ticket-note'),
  error: byId('error'),
  form: byId('broadcast-form'),
  keyLabel: byId('publisher-key-label'),
  key: byId('publisher-key'),
  room: byId('room'),
  camera: byId('camera-select'),
  mic: byId('mic-select'),
  goLive: byId('go-live'),
  stop: byId('stop'),
  preview: byId('preview'),
  previewNote: byId('preview-note'),
  roomName: byId('room-name'),
  roomSummary: byId('room-summary'),
  roomCeiling: byId('room-ceiling'),
  stagesBody: byId('stages-body'),
};

// Test hook; never holds the publisher key, the ticket or tokens.
const view = {
  state: 'starting',
  mode: null,
  hasTicket: false,
  waitingForTicket: false,
  room: null,
  stages: [],
  publishing: 0, // Stages this page publishes to right now
  roomStages: [],
  events: null, // the publisher events stream: state, reason, snapshots, added, removed, reconnects
  error: null,
};
window.fanoutBroadcast = view;

let config = null;
let sdk = null;
let media = null; // MediaStream from getUserMedia
// From Go live until Stop has finished or the room ended; kept after pagehide, which only stops it.
let session = null;

const isLive = () => session !== null && session.live;
const liveStages = () => (session ? session.stages : []);

function setState(state, text) {
  view.state = state;
  setStatus(els.status, state, text);
  const busy = state === 'going-live' || state === 'stopping';
  const live = isLive();
  els.goLive.disabled = busy || live || state === 'starting' || !config;
  els.stop.disabled = busy || !live;
  for (const input of [els.key, els.room, els.camera, els.mic]) input.disabled = busy || live;
}

// ---- the host app's ticket -----------------------------------------------------------------

function renderTicket() {
  const ticket = tickets.current;
  view.hasTicket = ticket !== null;
  els.keyLabel.hidden = els.key.hidden = view.hasTicket;
  els.key.required = !view.hasTicket;
  if (!ticket) return;
  const claims = tickets.claims();
  // The room the ticket names (the gateway refuses any other); not while live on another one.
  if (claims && claims.room && !isLive()) {
    els.room.value = claims.room;
    els.room.readOnly = true;
  }
  els.ticketNote.textContent = view.waitingForTicket
    ? 'The host app\'s ticket expired; waiting for a new one…'
    : `Admitted by the host app${claims && claims.room ? ` for room ${claims.room}` : ''}.`;
  els.ticketNote.hidden = false;
}

function onTicketWait(waiting) {
  view.waitingForTicket = waiting;
  renderTicket();
}

const ticketAuth = {
  isTicket: true,
  bearer: () => tickets.current,
  renewed: (code, options) => tickets.renewed(code, options),
};

function keyAuth(key) {
  return { isTicket: false, bearer: () => key, renewed: async () => false };
}

function fail(message) {
  view.error = message;
  showError(els.error, message);
}

function clearFailure() {
  view.error = null;
  clearError(els.error);
}

function currentRoom() {
  const room = els.room.value.trim();
  return ROOM_PATTERN.test(room) ? room : null;
}

// ---- camera and microphone -------------------------------------------------------------------

function mediaTracks() {
  return media ? media.getTracks().filter((track) => track.readyState === 'live') : [];
}

function describeMediaError(error) {
  switch (error && error.name) {
    case 'NotAllowedError':
    case 'SecurityError':
      return 'Camera and microphone access was denied. Allow them for this site in the browser settings, then reload.';
    case 'NotFoundError':
    case 'OverconstrainedError':
      return 'No camera or microphone was found (or the chosen one is gone). Connect one and pick it above.';
    case 'NotReadableError':
      return 'The camera or microphone is in use by another application.';
    default:
      return `Could not open the camera or microphone: ${(error && error.message) || error}`;
  }
}

async function fillDevicePickers() {
  const devices = await navigator.mediaDevices.enumerateDevices();
  const activeVideo = media && media.getVideoTracks()[0];
  const activeAudio = media && media.getAudioTracks()[0];
  const fill = (select, kind, active, fallback) => {
    const list = devices.filter((d) => d.kind === kind);
    select.replaceChildren(
      ...list.map((device, index) => new Option(device.label || `${fallback} ${index + 1}`, device.deviceId)),
    );
    const activeId = active && active.getSettings().deviceId;
    if (activeId) select.value = activeId;
  };
  fill(els.camera, 'videoinput', activeVideo, 'Camera');
  fill(els.mic, 'audioinput', activeAudio, 'Microphone');
}

async function startPreview() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    fail('This browser cannot open a camera here (it needs HTTPS or localhost).');
    return;
  }
  const camera = els.camera.value;
  const mic = els.mic.value;
  const constraints = {
    video: camera ? { deviceId: { exact: camera } } : { width: { ideal: 1280 }, height: { ideal: 720 } },
    audio: mic ? { deviceId: { exact: mic } } : true,
  };
  if (media) for (const track of media.getTracks()) track.stop();
  media = null;
  els.preview.srcObject = null;
  els.previewNote.textContent = 'Opening camera…';
  els.previewNote.hidden = false;
  try {
    media = await navigator.mediaDevices.getUserMedia(constraints);
  } catch (error) {
    els.previewNote.textContent = 'Camera unavailable';
    fail(describeMediaError(error));
    return;
  }
  els.preview.srcObject = media;
  els.previewNote.hidden = true;
  if (view.error && view.state !== 'error') clearFailure();
  await fillDevicePickers();
}

// ---- going live ----------------------------------------------------------------------------

function liveStatusText() {
  const stages = liveStages();
  const published = stages.filter((s) => s.publishState === 'published').length;
  return `Live: publishing to ${published} of ${stages.length} Stage(s) in room ${session.room}.`;
}

function eventsText(status) {
  if (!status) return '';
  switch (status.state) {
    case 'connecting':
      return 'Stage updates: connecting…';
    case 'open':
      return 'Stage updates: following the room.';
    case 'reconnecting':
      return status.retryInMs === null
        ? `Stage updates: reconnecting (${status.reason})…`
        : `Stage updates: lost (${status.reason}); reconnecting in ${Math.max(1, Math.round(status.retryInMs / 1000))} s.`;
    case 'failed':
      return `Stage updates: stopped (${status.reason}). New Stages are not joined until you go live again.`;
    case 'ended':
      return 'Stage updates: the room ended.';
    default:
      return '';
  }
}

function renderSummary() {
  const stages = liveStages();
  view.publishing = stages.filter((s) => s.publishState === 'published').length;
  els.publishingCount.textContent = String(view.publishing);
  els.publishingCount.title = `${view.publishing} of ${stages.length} joined Stage(s) published`;
  els.eventsState.textContent = eventsText(view.events);
  els.eventsState.dataset.state = view.events ? view.events.state : '';
  els.fanoutSummary.hidden = !isLive();
}

function onFanoutChange() {
  view.stages = liveStages();
  if (isLive() && view.state === 'live') setState('live', liveStatusText());
  renderSummary();
  renderStages();
}

function onEventsStatus(status) {
  view.events = status;
  renderSummary();
}

function onProblems(message) {
  if (message) fail(message);
  else if (view.state !== 'error') clearFailure();
}

function onLive() {
  view.room = session.room;
  setState('live', '');
}

function onRefused(message) {
  session = null;
  setState('idle', 'Not live.');
  fail(message);
}

function onEnded() {
  const room = session.room;
  session = null;
  view.stages = [];
  setState('ended', `The room ${room} was ended and its Stages deleted. Go live to start it again.`);
  renderSummary();
  refreshRoom();
}

function goLive() {
  clearFailure();
  const ticket = tickets.current;
  const key = els.key.value.trim();
  const room = currentRoom();
  if (!ticket && !key) return fail('Enter the publisher key.');
  if (!room) return fail('Room names are 1–64 characters: lowercase letters, digits and "-", starting with a letter or digit.');
  if (mediaTracks().length === 0) {
    return fail('Going live needs the camera and microphone. Allow access (or connect a device) and reload.');
  }
  if (!ticket) storageSet('sessionStorage', KEY_STORAGE, key);

  setState('going-live', 'Getting publish tokens…');
  session = new BroadcastSession({
    sdk,
    auth: ticket ? ticketAuth : keyAuth(key),
    room,
    getTracks: mediaTracks,
    onLive,
    onRefused,
    onChange: onFanoutChange,
    onProblems,
    onEventsStatus,
    onRoomChanged: refreshRoom,
    onEnded,
    onError: fail,
    onTicketWait,
  });
  session.start();
}

async function stop() {
  if (!isLive()) return;
  setState('stopping', 'Leaving every Stage…');
  await session.stop();
  session = null;
  view.stages = [];
  setState('idle', 'Not live.');
  renderSummary();
  renderStages();
}

// ---- room table ----------------------------------------------------------------------------

let lastRoomAnswer = null;
// After a 404 the room is only asked for again when something could have created it (Go live, a
// different room name), so an idle page does not repeat the same 404 every 2 s.
let missingRoom = null;

function renderStages() {
  const local = new Map(liveStages().map((s) => [s.stageArn, s]));
  const stages = lastRoomAnswer ? lastRoomAnswer.stages : [];
  view.roomStages = stages;
  renderStagesTable(els.stagesBody, stages, local, els.stagesBody.dataset.empty || 'No Stages yet.');
  renderCeiling(els.roomCeiling, lastRoomAnswer);
}

async function refreshRoom() {
  const room = session ? session.room : currentRoom();
  view.room = room;
  els.roomName.textContent = room || '';
  if (!room) {
    lastRoomAnswer = null;
    els.roomSummary.textContent = 'Enter a valid room name.';
    renderStages();
    return;
  }
  if (room === missingRoom && !isLive()) return;
  try {
    lastRoomAnswer = await getRoom(room);
    missingRoom = null;
    const { viewers, stages, origins, replicas, overflow, viewersByTier } = lastRoomAnswer;
    const topology = replicas ? ` (${origins} origin(s), ${replicas} replica(s))` : '';
    // With an overflow tier, the viewers per tier and the state of its composition (DESIGN.md §5).
    const tiers = viewersByTier || { realtime: viewers, overflow: 0 };
    const split = overflow || tiers.overflow ? ` (${tiers.realtime} real-time + ${tiers.overflow} overflow)` : '';
    const overflowState = overflow ? ` Overflow tier: ${overflow.state}${overflow.error ? ` (${overflow.error})` : ''}.` : '';
    els.roomSummary.dataset.realtime = String(tiers.realtime);
    els.roomSummary.dataset.overflow = String(tiers.overflow);
    els.roomSummary.dataset.overflowState = overflow ? overflow.state : '';
    els.roomSummary.textContent = `${viewers} viewer(s)${split} on ${stages.length} Stage(s)${topology}.${overflowState} Updated ${new Date().toLocaleTimeString()}.`;
    els.stagesBody.dataset.empty = 'No Stages yet.';
  } catch (error) {
    lastRoomAnswer = null;
    if (error.status === 404) {
      missingRoom = room;
      els.stagesBody.dataset.empty = 'This room does not exist yet; Go live creates it.';
      els.roomSummary.textContent = '';
    } else {
      els.roomSummary.textContent = `Could not refresh the room: ${error.message}`;
    }
  }
  renderStages();
}

function pollRoom() {
  refreshRoom().finally(() => setTimeout(pollRoom, ROOM_REFRESH_MS));
}

// ---- start ---------------------------------------------------------------------------------

async function main() {
  els.key.value = storageGet('sessionStorage', KEY_STORAGE) || '';
  tickets.onTicket(() => {
    renderTicket();
    refreshRoom();
  });
  els.form.addEventListener('submit', (event) => {
    event.preventDefault();
    goLive();
  });
  els.stop.addEventListener('click', stop);
  els.camera.addEventListener('change', startPreview);
  els.mic.addEventListener('change', startPreview);
  els.room.addEventListener('change', () => {
    missingRoom = null;
    refreshRoom();
  });
  // The page is going away: leave the Stages and tell the gateway without waiting for answers.
  window.addEventListener('pagehide', () => session && session.stop({ unloading: true }));

  try {
    config = await getConfig();
  } catch (error) {
    setState('error', 'Cannot start.');
    fail(`Could not load the configuration: ${error.message}`);
    return;
  }
  view.mode = config.mode;
  els.room.value = roomFromQuery() || config.defaultRoom || 'main';
  renderTicket();

  try {
    sdk = await loadStageSdk(config);
  } catch (error) {
    setState('error', 'Cannot start.');
    fail(error.message);
    return;
  }
  if (config.mode !== 'aws') {
    els.modeNote.textContent =
      'Local mode: the Stages live in the IVS emulator and video goes straight from this browser to each viewer.';
    els.modeNote.hidden = false;
  }

  setState('idle', 'Not live.');
  pollRoom();
  await startPreview();
}

main();
