//! Kubernetes discovery for epp.
