/*
 * nvseal's view of SPDK: the one header bindgen reads (build.rs, `spdk` feature).
 *
 * It names the SPDK headers nvseal uses; build.rs allow-lists the functions and types that the
 * safe layer (src/spdk/) calls, so the generated bindings stay small. Nothing of SPDK is kept
 * in this repository: the headers come from the SPDK installation pkg-config finds.
 *
 * The functions declared below are ours (shim.c): SPDK's helpers that are macros or
 * `static inline`, which bindgen cannot bind, wrapped as plain functions.
 */
#ifndef NVSEAL_SPDK_H
#define NVSEAL_SPDK_H

#include <spdk/stdinc.h>
#include <spdk/env.h>
#include <spdk/nvme.h>
#include <spdk/version.h>

/* A completion's status code type and status code (spdk_nvme_cpl's bit fields). */
void nvseal_spdk_cpl_status(const struct spdk_nvme_cpl *cpl, uint16_t *sct, uint16_t *sc);

/* Whether the completion is an error (spdk_nvme_cpl_is_error, a macro). */
bool nvseal_spdk_cpl_is_error(const struct spdk_nvme_cpl *cpl);

/* The SPDK version this shim was compiled against, as SPDK_VERSION_STRING. */
const char *nvseal_spdk_version_string(void);

#endif
