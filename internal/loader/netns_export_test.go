package loader

// NetnsCookieByProgram is the pre-5.14 way to the namespace cookie, for the
// test that compares it with SO_NETNS_COOKIE.
var NetnsCookieByProgram = netnsCookieByProgram
