"""Look at the product's results in the OHIF viewer: a throwaway Orthanc, OHIF and a proxy on loopback."""
