// The batch table of camid's page and case report: sort by a column, show only some rows, open a row's card.
// Plain DOM, no library, no network: the report runs it from a file:// page.
"use strict";
(function () {
  function cellValue(row, column, kind) {
    const cell = row.cells[column];
    const raw = cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent.trim();
    return kind === "number" ? parseFloat(raw) : raw.toLowerCase();
  }

  function sortBy(table, th) {
    const column = th.cellIndex, kind = th.dataset.sort;
    const order = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    table.querySelectorAll("th[data-sort]").forEach((h) => h.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", order === 1 ? "ascending" : "descending");
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    rows.sort((a, b) => {
      const x = cellValue(a, column, kind), y = cellValue(b, column, kind);
      return (x < y ? -1 : x > y ? 1 : 0) * order;
    });
    rows.forEach((row) => body.appendChild(row));
  }

  function filter(batch) {
    const wanted = Array.from(batch.querySelectorAll("input[data-filter]:checked")).map((i) => i.dataset.filter);
    const text = batch.querySelector("input.search").value.trim().toLowerCase();
    const rows = Array.from(batch.querySelectorAll("tbody tr"));
    let shown = 0;
    rows.forEach((row) => {
      const flags = row.dataset.flags.split(" ");
      const ok = (!wanted.length || wanted.some((f) => flags.includes(f))) &&
                 (!text || row.textContent.toLowerCase().includes(text));
      row.hidden = !ok;
      shown += ok ? 1 : 0;
    });
    batch.querySelector(".shown").textContent = `${shown} of ${rows.length} shown`;
  }

  function openCard(id) {
    const card = document.getElementById(id);
    if (!card) return;
    card.open = true;
    card.scrollIntoView({ block: "start" });
    if (location.hash !== "#" + id) history.replaceState(null, "", "#" + id);
  }

  function setup(root) {
    root.querySelectorAll(".batch").forEach((batch) => {
      const table = batch.querySelector("table");
      table.querySelectorAll("th[data-sort]").forEach((th) => th.addEventListener("click", () => sortBy(table, th)));
      batch.querySelectorAll("input[data-filter]").forEach((i) => i.addEventListener("change", () => filter(batch)));
      batch.querySelector("input.search").addEventListener("input", () => filter(batch));
      table.querySelectorAll("tbody tr").forEach((row) => {
        row.addEventListener("click", () => openCard(row.dataset.card));
        row.addEventListener("keydown", (e) => { if (e.key === "Enter") openCard(row.dataset.card); });
      });
      filter(batch);
    });
  }

  window.camid = { setup: setup, openCard: openCard };
  document.addEventListener("DOMContentLoaded", () => {
    setup(document);
    if (location.hash.startsWith("#card-")) openCard(location.hash.slice(1));
  });
})();
