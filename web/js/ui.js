// Small DOM helpers shared by the pages.

export function byId(id) {
  const element = document.getElementById(id);
  if (!element) throw new Error(`missing element #${id}`);
  return element;
}

/** Status line: text for people, data-state for styling and tests. */
export function setStatus(element, state, text) {
  element.dataset.state = state;
  element.textContent = text;
}

export function showError(element, message) {
  element.textContent = message;
  element.hidden = false;
}

export function clearError(element) {
  element.textContent = '';
  element.hidden = true;
}

/** The resource id at the end of a Stage ARN (arn:aws:ivs:region:account:stage/<id>). */
export function stageId(stageArn) {
  if (!stageArn) return '';
  const slash = stageArn.lastIndexOf('/');
  return slash >= 0 ? stageArn.slice(slash + 1) : stageArn;
}

export const ROOM_PATTERN = /^[a-z0-9][a-z0-9-]{0,63}$/;

/** The room from ?room=, if present and valid. */
export function roomFromQuery() {
  const room = new URLSearchParams(window.location.search).get('room');
  return room && ROOM_PATTERN.test(room) ? room : null;
}

// `storageName` is 'localStorage' or 'sessionStorage': in a frame of another site even reading the
// property can throw (third-party storage blocked), so it is read inside the try.
export function storageGet(storageName, key) {
  try {
    return window[storageName].getItem(key);
  } catch {
    return null;
  }
}

export function storageSet(storageName, key, value) {
  try {
    const storage = window[storageName];
    if (value === null || value === undefined || value === '') storage.removeItem(key);
    else storage.setItem(key, value);
  } catch {
    // Storage can be disabled (private mode, a third-party frame); the page works without persistence.
  }
}
