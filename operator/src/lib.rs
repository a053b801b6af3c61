//! The Tenantry operator: the `Tenant` custom resource, the pure builders of its child
//! objects, the PKI, and the controller that applies them.
