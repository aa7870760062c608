//! The dashboard's observer peer in the browser worker: [`Observer`] behind the same
//! relay transport as the training peer (the page holds the WebRTC connections).

use std::rc::Rc;

use js_sys::{Array, Uint8Array};
use shoal_shared::engine::train::Samples;
use shoal_shared::task::TaskSpec;
use wasm_bindgen::prelude::*;

use shoal_web_client::observe::Observer;
use shoal_web_client::swarm::Transport;
use shoal_web_client::wasm::{EarlyEvents, Relay, now_ms};

/// An observer of a task's swarm, driven from JavaScript.
#[wasm_bindgen]
pub struct SwarmObserver {
    relay: Rc<Relay>,
    inner: Observer,
    last_report: f64,
}

#[wasm_bindgen]
impl SwarmObserver {
    /// An observer of `task` (its JSON from `/api/tasks/{name}`), evaluating on the
    /// held-out split built from `files` (the task's data files, in the order listed),
    /// asking for the model every `every_ms` milliseconds.
    pub fn create(
        task: String,
        files: Vec<Uint8Array>,
        every_ms: f64,
    ) -> Result<SwarmObserver, JsError> {
        let task = TaskSpec::from_json(&task).map_err(|e| JsError::new(&e.to_string()))?;
        let bytes: Vec<Vec<u8>> = files.iter().map(Uint8Array::to_vec).collect();
        let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        let test = if task.is_local() {
            task.test_dataset(&refs)
        } else {
            task.datasets(&refs).map(|(_, test)| test)
        }
        .map_err(|e| JsError::new(&e.to_string()))?;
        let relay = Rc::new(Relay::for_task(&task));
        let seed = shoal_web_client::wasm::secure_random()?;
        let inner = Observer::new(
            task,
            Samples::from_dataset(&test),
            every_ms.max(500.0),
            seed,
        )
        .map_err(|e| JsError::new(&e))?;
        Ok(Self {
            relay,
            inner,
            last_report: f64::NEG_INFINITY,
        })
    }

    /// A transport event from the page (as for `SwarmPeer.event`).
    pub fn event(&self, kind: &str, peer: &str, data: Option<Vec<u8>>) -> Result<(), JsError> {
        self.relay.event(kind, peer, data)
    }

    /// Takes over the events that arrived before this observer existed (as for
    /// `SwarmPeer.adopt`).
    pub fn adopt(&self, early: &EarlyEvents) {
        self.relay.adopt(early);
    }

    /// Takes in the events so far and asks for the model when due. Returns the new
    /// evaluations as JSON (`[{version, accuracy, loss, at_ms}]`, often empty).
    pub fn tick(&mut self) -> String {
        let mut points = Vec::new();
        loop {
            let ev = self.relay.pop_event();
            let Some(ev) = ev else { break };
            if let Some(p) = self.inner.handle(ev, &*self.relay, now_ms()) {
                points.push(p);
            }
        }
        let now = now_ms();
        if let Some(p) = self.inner.tick(&*self.relay, now) {
            points.push(p);
        }
        // Report on news, and every few seconds so the server lists it as an observer.
        if !points.is_empty() || now - self.last_report > 5_000.0 {
            self.last_report = now;
            self.relay.report(&self.inner.report());
        }
        serde_json::to_string(&points).unwrap_or_else(|_| "[]".into())
    }

    /// The messages to send, as `[peer, Uint8Array]` pairs.
    pub fn outgoing(&self) -> Array {
        self.relay.drain()
    }

    /// Neighbours that broke the protocol, for the page to close and report
    /// `unreachable` (`Swarm.dropNeighbour`), since the last call.
    #[wasm_bindgen(js_name = takeDrops)]
    pub fn take_drops(&self) -> Vec<String> {
        self.relay.take_drops()
    }

    /// The latest report for the server as JSON, if a new one is due.
    #[wasm_bindgen(js_name = takeReport)]
    pub fn take_report(&self) -> Option<String> {
        let r = self.relay.take_report()?;
        serde_json::to_string(&r).ok()
    }

    /// The newest model as a safetensors file (throws before the first download), with
    /// the task's ledger head at export time (`ledger_head`, 64 hex digits) in its
    /// metadata when given.
    #[wasm_bindgen(js_name = exportSafetensors)]
    pub fn export_safetensors(&self, ledger_head: Option<String>) -> Result<Vec<u8>, JsError> {
        self.inner
            .export(ledger_head.as_deref())
            .map_err(|e| JsError::new(&e))
    }

    /// The newest model version held, if any.
    pub fn version(&self) -> Option<f64> {
        self.inner.version().map(|v| v as f64)
    }
}
