// The broadcast page: camera preview, Go live (one Stage per publish token), Stop, and the room's
// Stages table. Publishing itself lives in StageFanout; this module wires it to the DOM and the API.
//
// Go live asks POST /api/token/publisher-all once (it creates the room and answers a bad key with a
// plain 401), joins those Stages, then follows the publisher events stream while live: a snapshot
// re-syncs the set of Stages (on every reconnect too), stage-added joins a new Stage, stage-removed
// leaves one, room-ended stops. So the audience can grow the pool without the page reloading.

import { getConfig, getPublisherTokens, getRoom, reportPublishing } from './api.js';
import { PublisherEvents } from './publisher-events.js';
import { loadStageSdk } from './sdk.js';
import { StageFanout } from './stage-fanout.js';
import { renderStagesTable } from './stages-table.js';
import {
  ROOM_PATTERN,
  byId,
  clearError,
  roomFromQuery,
  setStatus,
  showError,
  stageId,
  storageGet,
  storageSet,
} from './ui.js';

const ROOM_REFRESH_MS = 2000;
const KEY_STORAGE = 'fanout.publisherKey';

const els = {
  status: byId('status'),
  fanoutSummary: byId('fanout-summary'),
  publishingCount: byId('publishing-count'),
  eventsState: byId('events-state'),
  modeNote: byId('mode-note'),
  error: byId('error'),
  form: byId('broadcast-form'),
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
  stagesBody: byId('stages-body'),
};

// Test hook; never holds the publisher key or tokens.
const view = {
  state: 'starting',
  mode: null,
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
let fanout = null;
let events = null; // PublisherEvents while live
let liveRoom = null; // room the current fan-out belongs to
let liveKey = null;
const problems = new Map(); // stageArn -> problem text

function setState(state, text) {
  view.state = state;
  setStatus(els.status, state, text);
  const busy = state === 'going-live' || state === 'stopping';
  const live = fanout !== null;
  els.goLive.disabled = busy || live || state === 'starting' || !config;
  els.stop.disabled = busy || !live;
  for (const input of [els.key, els.room, els.camera, els.mic]) input.disabled = busy || live;
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

async function report(stageArn, publishing, options) {
  if (!liveKey || !liveRoom) return;
  try {
    await reportPublishing(liveKey, liveRoom, stageArn, publishing, options);
  } catch (error) {
    // 404: the Stage (or the room) is already gone, deleted by scale-in or by ending the room, maybe
    // between our join and this report. Its stage-removed or room-ended is on its way; nothing to say.
    if (error.status === 404) {
      console.info(`publisher status for stage ${stageId(stageArn)} not reported: the Stage is gone (${error.code})`);
      return;
    }
    console.warn(`publisher status report failed for stage ${stageId(stageArn)}: ${error.code}`);
    fail(`Could not report the publish state of Stage ${stageId(stageArn)}: ${error.message}`);
  }
}

function onProblem(stageArn, problem) {
  if (problem) problems.set(stageArn, problem);
  else problems.delete(stageArn);
  if (problems.size === 0) {
    if (view.state !== 'error') clearFailure();
    return;
  }
  fail([...problems].map(([arn, text]) => `Stage ${stageId(arn)}: ${text}`).join('\n'));
}

function liveStatusText() {
  const stages = fanout ? fanout.stages : [];
  const published = stages.filter((s) => s.publishState === 'published').length;
  return `Live: publishing to ${published} of ${stages.length} Stage(s) in room ${liveRoom}.`;
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
  const stages = fanout ? fanout.stages : [];
  view.publishing = stages.filter((s) => s.publishState === 'published').length;
  els.publishingCount.textContent = String(view.publishing);
  els.publishingCount.title = `${view.publishing} of ${stages.length} joined Stage(s) published`;
  els.eventsState.textContent = eventsText(view.events);
  els.eventsState.dataset.state = view.events ? view.events.state : '';
  els.fanoutSummary.hidden = !fanout;
}

function onFanoutChange() {
  view.stages = fanout ? fanout.stages : [];
  if (fanout && view.state === 'live') setState('live', liveStatusText());
  renderSummary();
  renderStages();
}

function onEventsStatus(status) {
  view.events = status;
  renderSummary();
}

function followRoom(key, room) {
  events = new PublisherEvents({
    publisherKey: key,
    room,
    onSnapshot: (tokens) => fanout && fanout.sync(tokens),
    onStageAdded: (token) => {
      if (!fanout) return;
      fanout.add(token);
      refreshRoom();
    },
    onStageRemoved: (stageArn) => {
      if (!fanout) return;
      fanout.remove(stageArn);
      refreshRoom();
    },
    onRoomEnded: roomEnded,
    onFatal: (error) => {
      if (error.status === 401) fail('Stage updates: the publisher key was rejected (401); new Stages are not joined.');
      else fail(`Stage updates stopped: ${error.message}`);
    },
    onStatus: onEventsStatus,
  });
  events.start();
}

// Someone ended the room (DELETE /api/rooms/{room}, or it idled out): its Stages are being deleted.
function roomEnded() {
  const room = liveRoom;
  if (fanout) fanout.removeAll();
  fanout = null;
  events = null;
  liveKey = null;
  liveRoom = null;
  problems.clear();
  view.stages = [];
  setState('ended', `The room ${room} was ended and its Stages deleted. Go live to start it again.`);
  renderSummary();
  refreshRoom();
}

async function goLive() {
  clearFailure();
  const key = els.key.value.trim();
  const room = currentRoom();
  if (!key) return fail('Enter the publisher key.');
  if (!room) return fail('Room names are 1–64 characters: lowercase letters, digits and "-", starting with a letter or digit.');
  if (mediaTracks().length === 0) {
    return fail('Going live needs the camera and microphone. Allow access (or connect a device) and reload.');
  }
  storageSet(sessionStorage, KEY_STORAGE, key);

  setState('going-live', 'Getting publish tokens…');
  let answer;
  try {
    answer = await getPublisherTokens(key, { room });
  } catch (error) {
    setState('idle', 'Not live.');
    if (error.status === 401) fail('The publisher key was rejected (401). Check it and try again.');
    else fail(`Could not get publish tokens: ${error.message}`);
    return;
  }

  liveKey = key;
  liveRoom = answer.room;
  view.room = answer.room;
  problems.clear();
  fanout = new StageFanout({
    sdk,
    getTracks: mediaTracks,
    onPublishing: (stageArn, publishing) => report(stageArn, publishing),
    onProblem,
    onChange: onFanoutChange,
  });
  setState('live', '');
  fanout.sync(answer.tokens);
  onFanoutChange();
  followRoom(key, answer.room);
  refreshRoom();
}

async function stop() {
  if (!fanout) return;
  setState('stopping', 'Leaving every Stage…');
  if (events) events.stop();
  events = null;
  view.events = null;
  const left = fanout.removeAll();
  fanout = null;
  view.stages = [];
  await Promise.allSettled(left.map((stageArn) => report(stageArn, false)));
  liveKey = null;
  liveRoom = null;
  problems.clear();
  setState('idle', 'Not live.');
  renderSummary();
  renderStages();
}

// The page is going away: leave the Stages and tell the gateway without waiting for answers.
function stopOnUnload() {
  if (events) events.stop();
  events = null;
  if (!fanout) return;
  const left = fanout.removeAll();
  for (const stageArn of left) report(stageArn, false, { keepalive: true });
  fanout = null;
}

// ---- room table ----------------------------------------------------------------------------

let lastRoomAnswer = null;
// After a 404 the room is only asked for again when something could have created it (Go live, a
// different room name), so an idle page does not repeat the same 404 every 2 s.
let missingRoom = null;

function renderStages() {
  const local = new Map((fanout ? fanout.stages : []).map((s) => [s.stageArn, s]));
  const stages = lastRoomAnswer ? lastRoomAnswer.stages : [];
  view.roomStages = stages;
  renderStagesTable(els.stagesBody, stages, local, els.stagesBody.dataset.empty || 'No Stages yet.');
}

async function refreshRoom() {
  const room = liveRoom || currentRoom();
  view.room = room;
  els.roomName.textContent = room || '';
  if (!room) {
    lastRoomAnswer = null;
    els.roomSummary.textContent = 'Enter a valid room name.';
    renderStages();
    return;
  }
  if (room === missingRoom && !fanout) return;
  try {
    lastRoomAnswer = await getRoom(room);
    missingRoom = null;
    const count = lastRoomAnswer.stages.length;
    els.roomSummary.textContent = `${lastRoomAnswer.viewers} viewer(s) on ${count} Stage(s). Updated ${new Date().toLocaleTimeString()}.`;
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
  els.key.value = storageGet(sessionStorage, KEY_STORAGE) || '';
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
  window.addEventListener('pagehide', stopOnUnload);

  try {
    config = await getConfig();
  } catch (error) {
    setState('error', 'Cannot start.');
    fail(`Could not load the configuration: ${error.message}`);
    return;
  }
  view.mode = config.mode;
  els.room.value = roomFromQuery() || config.defaultRoom || 'main';

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
