//! TAP offload, sans-io: the `virtio_net_hdr` in front of every TAP read and write, software
//! segmentation of the kernel's super-frames for the clients (TAP → client), and coalescing of
//! the clients' TCP segments into super-frames for the kernel (client → TAP). Pure functions
//! over caller-owned buffers; nothing is allocated per frame.

pub mod coalesce;
mod headers;
pub mod segment;
pub mod vnet;

#[cfg(test)]
mod testkit;
