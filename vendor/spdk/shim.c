/*
 * nvseal's C shim over SPDK's macros and inline helpers (see nvseal_spdk.h). Compiled by
 * build.rs with the include flags pkg-config gives for SPDK; `spdk` feature only.
 */
#include "nvseal_spdk.h"

void
nvseal_spdk_cpl_status(const struct spdk_nvme_cpl *cpl, uint16_t *sct, uint16_t *sc)
{
	*sct = cpl->status.sct;
	*sc = cpl->status.sc;
}

bool
nvseal_spdk_cpl_is_error(const struct spdk_nvme_cpl *cpl)
{
	return spdk_nvme_cpl_is_error(cpl);
}

const char *
nvseal_spdk_version_string(void)
{
	return SPDK_VERSION_STRING;
}
