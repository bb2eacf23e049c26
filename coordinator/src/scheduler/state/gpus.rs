//! Which of an agent's GPUs each lease holds: devices are picked when an
//! action is leased, named in the lease (to agents that read the list),
//! and freed with the lease's slot — when the process exits, the result
//! arrives, the lease is cancelled or its agent is lost.

use super::*;

use crate::scheduler::gpus;

/// The lease holding each of an agent's devices, by position in its offer.
#[derive(Clone, Debug, Default)]
pub(super) struct Held(Vec<Option<String>>);

impl Held {
    fn held(&self) -> Vec<bool> {
        self.0.iter().map(Option::is_some).collect()
    }

    /// Devices in use.
    fn in_use(&self) -> usize {
        self.0.iter().filter(|h| h.is_some()).count()
    }

    /// Follows a new registration: the leases it still runs keep their
    /// devices (those the agent still has).
    pub(super) fn resize(&mut self, devices: usize) {
        self.0.resize(devices, None);
    }
}

impl Agent {
    /// Devices the action could have now; `None` when too few are free.
    pub(super) fn free_gpus(&self, req: &Requirements) -> Option<Vec<usize>> {
        gpus::pick(&self.offer.gpus, &self.gpus.held(), req)
    }

    /// Gives the devices at `positions` to a lease; what the lease names.
    /// Gives the devices at `positions` to a lease.
    pub(super) fn hold_gpus(&mut self, positions: &[usize], lease_id: &str) {
        self.gpus.resize(self.offer.gpus.len());
        for &i in positions {
            if let Some(holder) = self.gpus.0.get_mut(i) {
                *holder = Some(lease_id.to_owned());
            }
        }
    }

    /// The devices at `positions` as a lease names them; none for an
    /// agent that cannot read the list (it would ignore it): such an
    /// agent's GPUs are counted and held all the same, so two actions
    /// never get more than it has.
    pub(super) fn named_gpus(&self, positions: &[usize]) -> Vec<fleet::GpuDevice> {
        if !self.offer.gpu_assignment {
            return Vec::new();
        }
        positions
            .iter()
            .filter_map(|&i| self.offer.gpus.get(i).map(gpus::Device::to_proto))
            .collect()
    }

    pub(super) fn release_gpus(&mut self, lease_id: &str) {
        for holder in &mut self.gpus.0 {
            if holder.as_deref() == Some(lease_id) {
                *holder = None;
            }
        }
    }

    /// For people: each device and whether a lease holds it
    /// (`#0 h100 (80GiB, compute capability 9.0), in use`).
    pub(super) fn describe_gpus(&self) -> Vec<String> {
        self.offer
            .gpus
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let used = self.gpus.0.get(i).is_some_and(Option::is_some);
                format!(
                    "#{} {}{}",
                    d.index,
                    d.describe(),
                    if used { ", in use" } else { "" }
                )
            })
            .collect()
    }
}

impl State {
    /// Each connected agent's GPUs, used and free (agents gone drop out).
    pub(super) fn gpu_gauges(&self) {
        let family = &self.metrics.gpus;
        family.clear();
        for (id, agent) in &self.agents {
            let total = agent.offer.gpus.len();
            if agent.outgoing.is_none() || total == 0 {
                continue;
            }
            let used = agent.gpus.in_use().min(total);
            for (state, n) in [("used", used), ("free", total - used)] {
                family
                    .get_or_create(&metrics::GpuLabels {
                        agent: id.clone(),
                        state,
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }
}
