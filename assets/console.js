// berth's console: live updates and log following. Every page works without this file; with it,
// a page follows the agent's events and shows a pass's result without a reload.
"use strict";

(function () {
  const live = document.getElementById("live");
  const say = (text) => { if (live) { live.textContent = text; } };

  // The page's main part, fetched again and put in place: the server renders, this only swaps.
  async function refresh() {
    const answer = await fetch(window.location.href, { credentials: "same-origin", cache: "no-store" });
    if (!answer.ok) { return; }
    const page = new DOMParser().parseFromString(await answer.text(), "text/html");
    const fresh = page.getElementById("main");
    const main = document.getElementById("main");
    if (!fresh || !main) { return; }
    // Two passes in quick succession: an answer that comes late never puts an older page back.
    if (Number(fresh.dataset.pass) < Number(main.dataset.pass)) { return; }
    // A followed log keeps its place: it is not part of a pass.
    const log = main.querySelector("pre[data-follow]");
    main.replaceChildren(...fresh.childNodes);
    if (fresh.dataset.pass) { main.dataset.pass = fresh.dataset.pass; }
    if (log && main.querySelector("pre[data-follow]")) {
      main.querySelector("pre[data-follow]").replaceWith(log);
    }
  }

  // The page says which pass it shows: one that ended while the page was on its way is sent at
  // once, so the page never stays behind it.
  const main = document.getElementById("main");
  if (window.EventSource && document.querySelector("header nav") && main) {
    const events = new EventSource("/console/events?since=" + encodeURIComponent(main.dataset.pass || ""));
    events.addEventListener("pass", (event) => {
      say("pass " + event.data + ": updated " + new Date().toLocaleTimeString());
      // A run's page changes with its run, not with passes: it is fetched again when the run ends.
      if (!document.querySelector("pre.log")) {
        refresh().catch(() => {});
      }
    });
    events.onerror = () => say("live updates paused; retrying");
  }

  // A running run's log, followed as it is written.
  const log = document.querySelector("pre[data-follow]");
  if (log && window.fetch && window.TextDecoder) {
    (async () => {
      const answer = await fetch(log.dataset.follow + "?follow=true", { credentials: "same-origin" });
      if (!answer.ok || !answer.body) { return; }
      const reader = answer.body.getReader();
      const decoder = new TextDecoder();
      log.textContent = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) { break; }
        log.append(document.createTextNode(decoder.decode(value, { stream: true })));
        log.scrollTop = log.scrollHeight;
      }
      say("the run ended");
      refresh().catch(() => {});
    })().catch(() => say("the log could not be followed"));
  }
})();
