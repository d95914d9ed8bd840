// Renders a room's Stages (GET /api/rooms/{room}) into a <tbody> as its topology: each origin, then
// the replicas it feeds, optionally merged with what this page is doing on each Stage (the
// broadcaster's publish state; the page publishes to origins only).

import { stageId } from './ui.js';

function cell(text, className) {
  const td = document.createElement('td');
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function badge(text, className) {
  const span = document.createElement('span');
  span.className = `badge ${className}`;
  span.textContent = text;
  return span;
}

/** Origins in index order, each followed by its replicas; Stages the room no longer lists go last. */
function topologyOrder(rows) {
  const key = (row) => {
    if (row.role === 'replica') return [row.originIndex ?? Infinity, 1, row.index ?? Infinity];
    return [row.index ?? Infinity, 0, 0];
  };
  return rows
    .map((row, position) => ({ row, key: [...key(row), position] }))
    .sort((a, b) => {
      for (let i = 0; i < a.key.length; i += 1) if (a.key[i] !== b.key[i]) return a.key[i] < b.key[i] ? -1 : 1;
      return 0;
    })
    .map(({ row }) => row);
}

function roleCell(row, originsByIndex) {
  const td = cell('', 'role');
  td.dataset.testid = 'stage-role';
  if (row.role === 'replica') {
    const origin = originsByIndex.get(row.originIndex);
    td.textContent = `↳ replica #${row.index} of origin #${row.originIndex}`;
    td.title = origin
      ? `IVS replicates the broadcaster from Stage ${stageId(origin.stageArn)} into this one.`
      : `Its origin #${row.originIndex} is not in the room any more.`;
  } else if (row.role === 'origin') {
    td.textContent = `origin #${row.index}`;
    td.title = 'The broadcast page publishes to this Stage itself.';
  } else {
    td.textContent = '—';
  }
  return td;
}

function replicationCell(row, replicaCount) {
  const td = cell('', 'replication');
  td.dataset.testid = 'stage-replication';
  if (row.role === 'replica') {
    const state = String(row.replication || 'UNKNOWN');
    // One wrapper, so the narrow layout (label | value grid) keeps the badge and its error together.
    const value = document.createElement('span');
    value.appendChild(badge(state, `replication-${state.toLowerCase()}`));
    if (row.replicationError) {
      const error = document.createElement('span');
      error.className = 'replication-error';
      error.dataset.testid = 'stage-replication-error';
      error.textContent = row.replicationError;
      value.append(' ', error);
    }
    td.appendChild(value);
  } else if (row.role === 'origin') {
    const count = replicaCount.get(row.index) || 0;
    td.textContent = count ? `feeds ${count} replica${count === 1 ? '' : 's'}` : '—';
  } else {
    td.textContent = '—';
  }
  return td;
}

/**
 * @param {HTMLTableSectionElement} tbody
 * @param {Array<{stageArn, index, role, state, viewers, capacity, originIndex?, replication?,
 *   replicationError?}>} roomStages
 * @param {Map<string, {publishState, problem}>} [local]  keyed by stageArn
 * @param {string} [emptyText]
 */
export function renderStagesTable(tbody, roomStages, local = new Map(), emptyText = 'No Stages yet.') {
  const rows = [];
  const seen = new Set();
  for (const stage of roomStages) {
    seen.add(stage.stageArn);
    rows.push({ ...stage, local: local.get(stage.stageArn) });
  }
  for (const [stageArn, entry] of local) {
    if (!seen.has(stageArn)) rows.push({ stageArn, state: '—', viewers: '—', capacity: '—', local: entry });
  }

  const labels = [...tbody.closest('table').querySelectorAll('thead th')].map((th) => th.textContent);
  if (rows.length === 0) {
    const tr = document.createElement('tr');
    const td = cell(emptyText, 'empty');
    td.colSpan = labels.length;
    tr.appendChild(td);
    tbody.replaceChildren(tr);
    return;
  }

  const originsByIndex = new Map(roomStages.filter((s) => s.role === 'origin').map((s) => [s.index, s]));
  const replicaCount = new Map();
  for (const stage of roomStages) {
    if (stage.role === 'replica') replicaCount.set(stage.originIndex, (replicaCount.get(stage.originIndex) || 0) + 1);
  }

  tbody.replaceChildren(
    ...topologyOrder(rows).map((row) => {
      const tr = document.createElement('tr');
      tr.dataset.stageArn = row.stageArn;
      tr.dataset.state = row.state;
      if (row.role) tr.dataset.role = row.role;
      if (row.role === 'replica') {
        tr.dataset.originIndex = String(row.originIndex);
        tr.dataset.replication = String(row.replication);
        tr.className = 'replica';
      }
      const idCell = cell(stageId(row.stageArn), 'stage-id');
      idCell.title = row.stageArn;
      const stateCell = document.createElement('td');
      stateCell.appendChild(badge(row.state, `state-${String(row.state).toLowerCase()}`));
      const text = row.local ? row.local.publishState + (row.local.problem ? ` — ${row.local.problem}` : '') : '—';
      const localCell = cell(text, row.local && row.local.problem ? 'local problem' : 'local');
      localCell.dataset.testid = 'stage-publish-state';
      if (!row.local && row.role === 'replica') localCell.title = 'Not joined: IVS replicates the origin here.';
      tr.append(
        idCell,
        roleCell(row, originsByIndex),
        stateCell,
        replicationCell(row, replicaCount),
        cell(String(row.viewers), 'num'),
        cell(String(row.capacity), 'num'),
        localCell,
      );
      [...tr.children].forEach((td, index) => {
        td.dataset.label = labels[index];
      });
      return tr;
    }),
  );
}

/**
 * The room's ceiling and the limit that sets it (GET /api/rooms/{room} `capacity`) into an element;
 * the limit's full explanation goes in its tooltip.
 */
export function renderCeiling(element, room) {
  const capacity = room && room.capacity;
  if (!capacity || capacity.ceiling === null || capacity.ceiling === undefined) {
    element.replaceChildren();
    element.hidden = true;
    delete element.dataset.bindingLimit;
    return;
  }
  const limit = document.createElement('strong');
  limit.className = 'binding-limit';
  limit.dataset.testid = 'binding-limit';
  limit.textContent = capacity.bindingLimit || 'unknown';
  limit.title = capacity.bindingLimitDescription || '';
  const description = document.createElement('span');
  description.className = 'binding-limit-description';
  description.dataset.testid = 'binding-limit-description';
  description.textContent = capacity.bindingLimitDescription || '';
  element.replaceChildren(
    `Ceiling: ${capacity.ceiling} viewer(s) on ${capacity.ceilingStages} Stage(s), set by `,
    limit,
    `. Region: ${capacity.regionSubscriptions} of ${capacity.regionSubscriptionQuota} subscriptions.`,
    description,
  );
  element.dataset.bindingLimit = capacity.bindingLimit || '';
  element.hidden = false;
}
