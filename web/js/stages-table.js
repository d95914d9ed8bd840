// Renders a room's Stages (GET /api/rooms/{room}) into a <tbody>, optionally merged with what this
// page is doing on each Stage (the broadcaster's publish state).

import { stageId } from './ui.js';

function cell(text, className) {
  const td = document.createElement('td');
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

/**
 * @param {HTMLTableSectionElement} tbody
 * @param {Array<{stageArn, state, viewers, capacity}>} roomStages
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
  const columns = labels.length;
  if (rows.length === 0) {
    const tr = document.createElement('tr');
    const td = cell(emptyText, 'empty');
    td.colSpan = columns;
    tr.appendChild(td);
    tbody.replaceChildren(tr);
    return;
  }

  tbody.replaceChildren(
    ...rows.map((row) => {
      const tr = document.createElement('tr');
      tr.dataset.stageArn = row.stageArn;
      tr.dataset.state = row.state;
      const idCell = cell(stageId(row.stageArn), 'stage-id');
      idCell.title = row.stageArn;
      const stateCell = document.createElement('td');
      const badge = document.createElement('span');
      badge.className = `badge state-${String(row.state).toLowerCase()}`;
      badge.textContent = row.state;
      stateCell.appendChild(badge);
      tr.append(idCell, stateCell, cell(String(row.viewers), 'num'), cell(String(row.capacity), 'num'));
      if (columns > 4) {
        const text = row.local ? row.local.publishState + (row.local.problem ? ` — ${row.local.problem}` : '') : '—';
        const td = cell(text, row.local && row.local.problem ? 'local problem' : 'local');
        td.dataset.testid = 'stage-publish-state';
        tr.appendChild(td);
      }
      [...tr.children].forEach((td, index) => {
        td.dataset.label = labels[index];
      });
      return tr;
    }),
  );
}
