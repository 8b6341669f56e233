//! Reads run directories and writes theory-versus-observation reports (later issue).
