// Client for the gateway's REST API (DESIGN.md §7). Every call resolves to parsed JSON (or null for
// 204) and rejects with an ApiError carrying the server's error code, the HTTP status and Retry-After.

export class ApiError extends Error {
  constructor(message, { code = 'error', status = 0, retryAfterSeconds = null } = {}) {
    super(message);
    this.name = 'ApiError';
    this.code = code;
    this.status = status;
    this.retryAfterSeconds = retryAfterSeconds;
  }
}

function parseRetryAfter(value) {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, (date - Date.now()) / 1000);
}

/** fetch() a JSON endpoint; `bearer` (a publisher key or a host app's ticket) adds the Authorization header. */
export async function apiFetch(path, { method = 'GET', body, bearer, signal, keepalive } = {}) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (bearer) headers.Authorization = `Bearer ${bearer}`;

  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
      signal,
      keepalive,
    });
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError('Cannot reach the server. Check your connection.', { code: 'network_error' });
  }

  if (response.status === 204) return null;
  let payload = null;
  const text = await response.text();
  if (text) {
    try {
      payload = JSON.parse(text);
    } catch {
      payload = null;
    }
  }
  if (!response.ok) {
    const error = payload && payload.error ? payload.error : {};
    throw new ApiError(error.message || `${method} ${path} failed (HTTP ${response.status})`, {
      code: error.code || `http_${response.status}`,
      status: response.status,
      retryAfterSeconds: parseRetryAfter(response.headers.get('Retry-After')),
    });
  }
  return payload;
}

const roomPath = (room) => `/api/rooms/${encodeURIComponent(room)}`;

export const getConfig = () => apiFetch('/api/config');

export const getRoom = (room, options = {}) => apiFetch(roomPath(room), options);

/** `bearer`: the publisher key or a publisher ticket (which fixes the room and userId). */
export const getPublisherTokens = (bearer, { room, userId } = {}) =>
  apiFetch('/api/token/publisher-all', { method: 'POST', bearer, body: { room, userId } });

/** `keepalive` lets the report outlive the page (sendBeacon cannot carry the Authorization header). */
/** participantId (optional): the page's id on that Stage, which the stage manager replicates. */
export const reportPublishing = (bearer, room, stageArn, publishing, { keepalive = false, participantId } = {}) =>
  apiFetch(`${roomPath(room)}/publisher/status`, {
    method: 'POST',
    bearer,
    keepalive,
    body: participantId ? { stageArn, publishing, participantId } : { stageArn, publishing },
  });

/** `ticket`: the host app's viewer ticket (FANOUT_VIEWER_AUTH=jwt); it decides the room and userId left out. */
export const getViewerToken = ({ room, userId, ticket } = {}) =>
  apiFetch('/api/token/viewer', { method: 'POST', bearer: ticket, body: { room, userId } });

// Heartbeat and leave carry no ticket: the gateway does not ask for one there (they act only on the
// lease a ticket admitted, which outlives the ticket), so leave can go out as a beacon.
export const sendHeartbeat = (room, userId) =>
  apiFetch('/api/viewer/heartbeat', { method: 'POST', body: { room, userId } });

/** Ends a viewer lease while the page unloads: sendBeacon survives navigation, fetch may not. */
export function leaveOnUnload(room, userId) {
  const blob = new Blob([JSON.stringify({ room, userId })], { type: 'application/json' });
  if (navigator.sendBeacon && navigator.sendBeacon('/api/viewer/leave', blob)) return;
  fetch('/api/viewer/leave', { method: 'POST', body: blob, keepalive: true }).catch(() => {});
}
