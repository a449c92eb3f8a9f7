// `camid ui`: send the photos one request each into a job, poll the job's progress, show its cards.
"use strict";
(function () {
  const body = document.body;
  const maxBytes = parseInt(body.dataset.maxBytes, 10), maxFiles = parseInt(body.dataset.maxFiles, 10);
  const $ = (id) => document.getElementById(id);

  function status(text, done, total) {
    $("status").hidden = false;
    $("status-text").textContent = text;
    $("progress").max = Math.max(total, 1);
    $("progress").value = done;
  }

  function fail(message) {
    $("error").textContent = message;
    $("error").hidden = false;
  }

  async function call(url, options) {
    let response;
    try {
      response = await fetch(url, options);
    } catch (err) {
      throw new Error("camid ui cannot be reached (was it stopped?): " + err.message);
    }
    const type = response.headers.get("content-type") || "";
    const answer = type.includes("json") ? await response.json() : await response.text();
    if (!response.ok) {
      const err = new Error(answer.error || answer || response.statusText);
      err.status = response.status;
      throw err;
    }
    return answer;
  }

  const post = (url, data) => call(url, { method: "POST", headers: { "content-type": "application/json" },
                                          body: JSON.stringify(data || {}) });

  async function uploadAll(files) {
    if (!files.length) return;
    if (files.length > maxFiles) return fail(`${files.length} photos: at most ${maxFiles} a batch (camid ui --max-files)`);
    $("error").hidden = true;
    $("results").innerHTML = "";
    const job = await post("/api/jobs", { source: "upload" });
    for (let i = 0; i < files.length; i++) {
      const file = files[i];
      status(`uploading ${i + 1} of ${files.length}: ${file.name}`, i, files.length);
      const name = "name=" + encodeURIComponent(file.name);
      if (file.size > maxBytes) {  // the server refuses it too; this spares sending it
        await post(`/api/jobs/${job.id}/refused`, { name: file.name, size: file.size });
      } else {
        try {
          await call(`/api/jobs/${job.id}/files?${name}`, { method: "POST", body: file,
                                                            headers: { "content-type": "application/octet-stream" } });
        } catch (err) {
          if (err.status !== 413) throw err;  // too large: the server keeps a card that says so
        }
      }
    }
    await post(`/api/jobs/${job.id}/start`);
    await follow(job.id);
  }

  async function follow(id) {
    let job;
    for (;;) {
      job = await call(`/api/jobs/${id}`);
      if (job.state === "failed") throw new Error(job.error);
      if (job.state === "done") break;
      const what = job.stage === "evidence" ? "reading the evidence of" : "scoring";
      status(`${what} photo ${Math.min(job.done + 1, job.total)} of ${job.total}`, job.done, job.total);
      await new Promise((resolve) => setTimeout(resolve, 400));
    }
    // The final status is set with the cards, from the job that said "done": a reader (or a test) that sees the
    // cards sees the count beside them, never a stale "scoring" line.
    const html = await call(`/jobs/${id}/results`);
    const results = $("results");
    results.innerHTML = html;
    status(`${job.answered} of ${job.total} photo${job.total === 1 ? "" : "s"} answered`, job.total, job.total);
    window.camid.setup(results);
    wire(results, id);
  }

  function wire(results, id) {
    results.querySelectorAll("button.show-heatmap").forEach((button) => button.addEventListener("click", async () => {
      const place = button.parentElement;
      button.disabled = true;
      button.textContent = "drawing the heat map and Grad-CAM…";
      try {
        place.innerHTML = await call(`/jobs/${id}/photos/${button.dataset.index}/heatmap`);
      } catch (err) {
        place.innerHTML = "";
        place.textContent = "no heat map: " + err.message;
      }
    }));
    const toggle = results.querySelector("input.with-heatmaps");
    toggle.addEventListener("change", () => results.querySelectorAll("a.export-all, a.export-one").forEach((a) => {
      const url = new URL(a.href);
      url.searchParams.set("heatmaps", toggle.checked ? "1" : "0");
      a.href = url.toString();
    }));
  }

  function run(promise) {
    promise.catch((err) => fail(err.message));
  }

  document.addEventListener("DOMContentLoaded", () => {
    const drop = $("drop");
    $("files").addEventListener("change", (e) => run(uploadAll(Array.from(e.target.files))));
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      run(uploadAll(Array.from(e.dataTransfer.files)));
    });
    const folder = $("folder");
    if (folder) folder.addEventListener("click", () => run(post("/api/jobs", { source: "folder" }).then((job) => {
      $("error").hidden = true;
      $("results").innerHTML = "";
      return follow(job.id);
    })));
  });
})();
